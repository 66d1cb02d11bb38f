"""Fault suite: every bad input a user can give ends in one clean line, exit 2, and nothing touched.

Each case runs a real command (``testbed.cli.main``, in this process) in a fresh copy of a small workspace
— a 24-image dataset, a poisoned copy, a 1-epoch run, an image folder — and checks, independently of the
code under test: the exit code, exactly one line on stderr naming the problem, no traceback, no new file,
and every file of the workspace byte-identical afterwards (sha256 before/after).  A full disk is simulated
without root in one child process (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, so writes fail with EFBIG).
Planted pickles would create a marker file when unpickled; the marker must never appear.

With ``TESTBED_FAULT_TALLY=FILE`` the campaign's totals (cases tried, clean errors, tracebacks, partial
files, data lost, code executed) are written to FILE as JSON at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from testbed.cli import main

REPO = Path(__file__).resolve().parents[1]
MARKER = "PWNED"  # what a planted pickle creates when it runs

# -- the tally ----------------------------------------------------------------------------------------
TALLY = {"tried": 0, "clean_errors": 0, "tracebacks": 0, "partial_files": 0, "data_lost": 0, "code_executed": 0}


def _dump_tally() -> None:
    path = os.environ.get("TESTBED_FAULT_TALLY")
    if path:
        Path(path).write_text(json.dumps(TALLY, indent=2) + "\n")


atexit.register(_dump_tally)


# -- workspace snapshots ------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` → sha256 of a file, ``link:TARGET`` for a link, ``dir`` for a directory."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    rc: int | None
    err: str
    crashed: str | None = None  # an exception that escaped main (a traceback for the user)


def judge(before: dict[str, str], after: dict[str, str], outcome: Outcome, code: int, needle: str,
          marker: Path | None = None, allow_new: bool = False) -> None:
    """Record the case in the tally, then assert: exit code, one clean line, nothing new, nothing changed."""
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    traceback = outcome.crashed is not None or "Traceback" in outcome.err
    new = sorted(set(after) - set(before))
    lost = sorted(k for k in before if after.get(k) != before[k])
    ran = marker is not None and marker.exists()
    clean = outcome.rc == code and len(lines) == 1 and not traceback
    TALLY["tried"] += 1
    TALLY["clean_errors"] += clean
    TALLY["tracebacks"] += traceback
    TALLY["partial_files"] += bool(new) and not allow_new
    TALLY["data_lost"] += bool(lost)
    TALLY["code_executed"] += ran
    assert not traceback, outcome.crashed or outcome.err
    assert outcome.rc == code, (outcome.rc, outcome.err)
    assert len(lines) == 1, outcome.err
    assert needle in lines[0], (needle, lines[0])
    assert allow_new or not new, f"new files: {new}"
    assert not lost, f"changed or removed: {lost}"
    assert not ran, "a planted pickle was executed"


def run_main(argv: list[str], capsys) -> Outcome:
    """``testbed -q ARGV`` in this process: -q because without a terminal, progress is reported as lines on
    stderr (docs of testbed.core.progress), and what is judged here is the error line."""
    capsys.readouterr()
    try:
        rc = main(["-q", *argv])
    except SystemExit as e:  # argparse exits
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - what would have been a traceback
        return Outcome(None, capsys.readouterr().err, f"{type(e).__name__}: {e}")
    return Outcome(rc, capsys.readouterr().err)


# -- the workspace ------------------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def bomb_png(path: Path, side: int = 30000) -> None:
    """A 70-byte PNG that declares side×side pixels (PIL's decompression-bomb check fires at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


class Boom:
    """Unpickling this runs ``touch MARKER`` (the planted-pickle attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """d.h5 (24+8 images, 32²), p.h5 (FGBA n-to-1, 25%), R/ (1 epoch), m.json (R's scores), imgs/ + c.txt."""
    from testbed import attacks
    from testbed.data.synth import SYNTH_CLASSES, make_synth_dataset, synth_scenes
    from testbed.training.loop import TrainConfig, train

    root = tmp_path_factory.mktemp("faults") / "base"
    root.mkdir()
    make_synth_dataset(root / "d.h5", n_train=24, n_test=8, size=32, seed=0)
    attacks.poison_file(root / "d.h5", root / "p.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                        rate=0.25, seed=0)
    train(root / "d.h5", root / "R", TrainConfig(model="deeplabv3_tiny", epochs=1, batch_size=8, device="cpu"),
          progress=False)
    shutil.copy(root / "R" / "metrics.json", root / "m.json")
    x, y = synth_scenes(4, size=32, seed=1)
    for sub in ("images", "masks"):
        (root / "imgs" / sub).mkdir(parents=True)
    for i in range(4):
        _png(root / "imgs" / "images" / f"{i}.png", x[i])
        _png(root / "imgs" / "masks" / f"{i}.png", y[i])
    (root / "c.txt").write_text("\n".join(SYNTH_CLASSES) + "\n")
    return root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    out = tmp_path / "ws"
    shutil.copytree(base, out, symlinks=True)
    return out


# -- setups: damage a copy ---------------------------------------------------------------------------
def h5_edit(name: str, edit: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        with h5py.File(ws / name, "a") as f:
            edit(f)

    return setup


def replace(name: str, make: Callable[[h5py.File, h5py.Dataset], None]) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        old = f[name]
        data = old[()]
        del f[name]
        make(f, data)

    return edit


def set_attr(key: str, value) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[key] = value

    return edit


def set_index(name: str, i: int, value: int) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[name][i] = value

    return edit


def config_edit(**changes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        cfg = json.loads((ws / "R" / "config.json").read_text())
        cfg.update(changes)
        (ws / "R" / "config.json").write_text(json.dumps(cfg))

    return setup


def write(rel: str, data: bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / rel).write_bytes(data)

    return setup


def link(rel: str, target: str, hard: bool = False) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        if hard:
            os.link(ws / target, ws / rel)
        else:
            os.symlink(ws / target, ws / rel)

    return setup


def planted(rel: str, torch_format: bool = False) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        if torch_format:
            import torch

            torch.save({"epoch": 1, "x": Boom(ws / MARKER)}, ws / rel)
        else:
            (ws / rel).write_bytes(pickle.dumps(Boom(ws / MARKER)))

    return setup


def spec(text: str, name: str = "z.toml") -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / name).write_text(text)

    return setup


def chain(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for s in setups:
            s(ws)

    return setup


ZOO_HEAD = ('[data]\nsynth = { n_train = 24, n_test = 8, size = 32, seed = 0 }\n[train]\nepochs = 1\nbatch_size = 8\n'
            '[[attack]]\nid = "benign"\n')
ZOO_GRID = '[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["benign"]\n'


def zoo_spec(train: str = "", attack: str = "", grid: str = ZOO_GRID, data: str | None = None) -> str:
    head = ZOO_HEAD.replace("epochs = 1\n", "epochs = 1\n" + train)
    if data is not None:
        head = head.replace("synth = { n_train = 24, n_test = 8, size = 32, seed = 0 }", data)
    return head + attack + grid


def n1(extra: str, attack: str = "fgba") -> str:
    """An [[attack]] table "a" plus a grid using it."""
    return (f'[[attack]]\nid = "a"\nattack = "{attack}"\n{extra}'
            '[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["a"]\n')


# -- the cases ---------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: list[str]  # "{ws}" is the workspace
    needle: str
    setup: Callable[[Path], None] | None = None
    code: int = 2
    marks: list = field(default_factory=list)

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


D, P, R = "{ws}/d.h5", "{ws}/p.h5", "{ws}/R"
SCORE = ["score", R, "--data", D, "--device", "cpu"]
PREDICT = ["predict", R, "--data", D, "--device", "cpu"]
TRAIN = ["train", D, "--model", "deeplabv3_tiny", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
ZOO = ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z", "--device", "cpu"]

CASES = [
    # 1. an output that is (or resolves to) an input
    Case("score-out-is-data", SCORE + ["--out", D], "--out"),
    Case("score-out-symlink-to-data", SCORE + ["--out", "{ws}/l.json"], "symbolic link", link("l.json", "d.h5")),
    Case("score-out-hardlink-to-data", SCORE + ["--out", "{ws}/h.json"], "hard link", link("h.json", "d.h5", hard=True)),
    Case("score-out-dotdot-to-data", SCORE + ["--out", "{ws}/imgs/../d.h5"], "is --data"),
    Case("score-out-is-run-config", SCORE + ["--out", R + "/config.json"], "a file of RUN/"),
    Case("score-out-is-run-metrics", SCORE + ["--out", R + "/metrics.json"], "a file of RUN/"),
    Case("score-out-is-before", SCORE + ["--before", "{ws}/m.json", "--out", "{ws}/m.json"], "is --before"),
    Case("score-out-is-a-directory", SCORE + ["--out", "{ws}/imgs"], "is a directory"),
    Case("predict-out-is-data", PREDICT + ["--out", D], "is --data"),
    Case("predict-out-is-run-weights", PREDICT + ["--out", R + "/model.safetensors"], "a file of RUN/"),
    Case("predict-out-hardlink-to-weights", PREDICT + ["--out", "{ws}/w.h5"], "hard link",
         link("w.h5", "R/model.safetensors", hard=True)),
    Case("predict-png-is-run", PREDICT + ["--out", "{ws}/pred.h5", "--png", R], "--png"),
    Case("show-out-is-data", ["data", "show", D, "--out", D], "is the dataset"),
    Case("show-out-symlink-to-data", ["data", "show", D, "--out", "{ws}/s.png"], "symbolic link", link("s.png", "d.h5")),
    Case("import-out-is-classes", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out",
                                   "{ws}/c.txt", "--force"], "is --classes"),
    Case("import-out-is-an-image", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out",
                                    "{ws}/imgs/images/0.png", "--force"], "a file of ROOT"),
    Case("train-out-holds-data", ["train", R + "/d2.h5", "--model", "deeplabv3_tiny", "--out", R, "--overwrite",
                                  "--device", "cpu"], "holds the training data",
         lambda ws: shutil.copy(ws / "d.h5", ws / "R" / "d2.h5")),
    Case("train-out-is-data", TRAIN + ["--out", D], "is the training data"),
    Case("poison-out-hardlink-to-clean", ["poison", D, "--attack", "fgba", "--preset", "n-to-1", "--target", "wall",
                                          "--trigger", "line", "--force", "--out", "{ws}/h.h5"], "input",
         link("h.h5", "d.h5", hard=True)),
    Case("bench-out-report-holds-data", ["bench", "--run", R, "--data", "{ws}/rep/p.h5", "--defense", "strip",
                                         "--device", "cpu", "--overwrite", "--out", "{ws}/rep"], "holds",
         chain(lambda ws: (ws / "rep").mkdir(), write("rep/results.json", b"{}"),
               lambda ws: shutil.copy(ws / "p.h5", ws / "rep" / "p.h5"))),
    Case("defend-out-is-run", ["defend", R, "--data", P, "--defense", "strip", "--device", "cpu", "--out", R], "--out"),
    # 6. OS errors: unwritable places
    Case("synth-out-in-proc", ["data", "synth", "--out", "/proc/x.h5", "--n-train", "4", "--n-test", "2"], "/proc"),
    Case("import-out-in-proc", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out",
                                "/proc/x.h5"], "/proc"),
    Case("train-out-in-proc", TRAIN + ["--out", "/proc/R"], "/proc"),
    Case("predict-out-in-proc", PREDICT + ["--out", "/proc/p.h5"], "/proc"),
    Case("score-out-in-proc", SCORE + ["--out", "/proc/s.json"], "/proc"),
    Case("poison-out-in-proc", ["poison", D, "--attack", "badnets", "--trigger", "line", "--out", "/proc/p.h5"], "/proc"),
    Case("zoo-out-in-proc", ["zoo", "build", "{ws}/z.toml", "--out", "/proc/z", "--device", "cpu"], "/proc",
         spec(zoo_spec())),
    Case("synth-out-missing-dir", ["data", "synth", "--out", "{ws}/nope/x.h5"], "does not exist"),
    Case("synth-out-is-dir", ["data", "synth", "--out", "{ws}/imgs"], "is a directory"),
    # 7. malformed inputs
    Case("info-images-is-a-group", ["data", "info", D], "not an array",
         h5_edit("d.h5", replace("train/images", lambda f, x: f.create_group("train/images")))),
    Case("train-images-is-a-group", TRAIN + ["--out", "{ws}/R2"], "not an array",
         h5_edit("d.h5", replace("train/images", lambda f, x: f.create_group("train/images")))),
    Case("info-index-is-a-group", ["data", "info", P], "not an array",
         h5_edit("p.h5", replace("test_benign/index", lambda f, x: f.create_group("test_benign/index")))),
    Case("info-integer-class-names", ["data", "info", D], "non-empty strings",
         h5_edit("d.h5", set_attr("classes", json.dumps(list(range(11)))))),
    Case("info-duplicate-class-names", ["data", "info", D], "more than once",
         h5_edit("d.h5", set_attr("classes", json.dumps(["wall"] * 11)))),
    Case("poison-duplicate-class-names", ["poison", D, "--attack", "badnets", "--trigger", "line", "--out",
                                          "{ws}/pp.h5"], "more than once",
         h5_edit("d.h5", set_attr("classes", json.dumps(["wall", "wall"] + ["x%d" % i for i in range(9)])))),
    Case("info-classes-not-a-list", ["data", "info", D], "JSON list", h5_edit("d.h5", set_attr("classes", "5"))),
    Case("info-empty-class-name", ["data", "info", D], "non-empty strings",
         h5_edit("d.h5", set_attr("classes", json.dumps([""] + ["x%d" % i for i in range(10)])))),
    Case("info-bad-image-size", ["data", "info", D], "image_size", h5_edit("d.h5", set_attr("image_size", [0, 32]))),
    Case("info-poison-index-out-of-range", ["data", "info", P], "outside /train",
         h5_edit("p.h5", set_index("train/poison_index", 0, 10**6))),
    Case("info-clean-index-negative", ["data", "info", P], "outside /train",
         h5_edit("p.h5", set_index("defense/clean_index", 0, -3))),
    Case("info-clean-index-float", ["data", "info", P], "integer array",
         h5_edit("p.h5", replace("defense/clean_index", lambda f, x: f.create_dataset("defense/clean_index",
                                                                                      data=x.astype(float))))),
    Case("info-attacked-index-out-of-range", ["data", "info", P], "outside /test",
         h5_edit("p.h5", set_index("test_attacked/index", 0, 99))),
    Case("defend-corrupt-clean-index", ["defend", R, "--data", P, "--defense", "strip", "--device", "cpu", "--out",
                                        "{ws}/def"], "outside /train",
         h5_edit("p.h5", set_index("defense/clean_index", 0, 10**6))),
    Case("info-labels-float", ["data", "info", D], "uint8",
         h5_edit("d.h5", replace("train/labels", lambda f, y: f.create_dataset("train/labels", data=y.astype(float))))),
    Case("info-label-out-of-range", ["data", "info", D], "holds label",
         h5_edit("d.h5", set_index("train/labels", 0, np.full((32, 32), 200, np.uint8)))),
    Case("info-truncated", ["data", "info", D], "d.h5", lambda ws: (ws / "d.h5").write_bytes((ws / "d.h5").read_bytes()[:2000])),
    Case("info-not-hdf5", ["data", "info", D], "not an HDF5 file", write("d.h5", b"hello\n")),
    Case("score-num-classes-not-a-number", SCORE, "num_classes", config_edit(num_classes="abc")),
    Case("score-classes-not-a-list", SCORE, "classes must be a list", config_edit(classes=5)),
    Case("score-model-not-a-string", SCORE, "model must be a model name", config_edit(model=5)),
    Case("score-aux-loss-not-bool", SCORE, "aux_loss", config_edit(aux_loss="yes")),
    Case("score-config-not-json", SCORE, "not valid JSON", write("R/config.json", b"{nope")),
    Case("score-config-a-list", SCORE, "JSON object", write("R/config.json", b"[1, 2]")),
    Case("score-weights-planted-pickle", SCORE, "pickle", planted("R/model.safetensors")),
    Case("predict-weights-planted-pickle", PREDICT + ["--out", "{ws}/pred.h5"], "pickle", planted("R/model.safetensors")),
    Case("score-weights-truncated", SCORE, "safetensors",
         lambda ws: (ws / "R/model.safetensors").write_bytes((ws / "R/model.safetensors").read_bytes()[:100])),
    Case("train-resume-planted-checkpoint", TRAIN + ["--out", R, "--resume"], "checkpoint",
         planted("R/checkpoint.pt", torch_format=True)),
    Case("train-resume-pickle-checkpoint", TRAIN + ["--out", R, "--resume"], "checkpoint", planted("R/checkpoint.pt")),
    Case("synth-negative-seed", ["data", "synth", "--out", "{ws}/s.h5", "--seed", "-1"], "seed"),
    Case("synth-size-beyond-memory", ["data", "synth", "--out", "{ws}/s.h5", "--size", "40000"], "of memory"),
    Case("import-decompression-bomb", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out",
                                       "{ws}/i.h5", "--workers", "1"], "decompression bomb",
         lambda ws: bomb_png(ws / "imgs" / "images" / "1.png")),
    Case("import-bomb-mask", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out",
                              "{ws}/i.h5", "--workers", "2"], "decompression bomb",
         lambda ws: bomb_png(ws / "imgs" / "masks" / "2.png")),
    # 8. argparse: one line and a --help hint
    Case("argparse-missing-args", ["score"], "--help"),
    Case("argparse-bad-int", ["data", "synth", "--out", "{ws}/s.h5", "--n-train", "abc"], "invalid int value"),
    Case("argparse-unknown-command", ["bogus"], "invalid choice"),
    Case("argparse-zoo-build-no-out", ["zoo", "build", "{ws}/z.toml"], "--out"),
    Case("argparse-train-no-model", ["train", D, "--out", "{ws}/R2"], "--model"),
    Case("argparse-bad-choice", PREDICT + ["--split", "nope", "--out", "{ws}/x.h5"], "--split"),
    # 5. zoo specs: refused before anything is written
    Case("zoo-hflip-string", ZOO, "hflip", spec(zoo_spec(train='hflip = "no"\n'))),
    Case("zoo-amp-number", ZOO, "amp", spec(zoo_spec(train="amp = 5\n"))),
    Case("zoo-aux-loss-string", ZOO, "aux_loss", spec(zoo_spec(train='aux_loss = "yes"\n'))),
    Case("zoo-clean-fraction-one", ZOO, "clean_fraction",
         spec(ZOO_HEAD + n1('preset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\nclean_fraction = 1.0\n'))),
    Case("zoo-synth-beyond-memory", ZOO, "of memory",
         spec(zoo_spec(data="synth = { n_train = 1000, n_test = 10, size = 40000 }"))),
    Case("zoo-synth-negative-seed", ZOO, "seed", spec(zoo_spec(data="synth = { n_train = 24, seed = -2 }"))),
    Case("zoo-out-not-a-zoo", ZOO, "not a zoo", chain(spec(zoo_spec()), lambda ws: (ws / "Z").mkdir(),
                                                      lambda ws: (ws / "Z" / "notes.txt").write_text("mine\n"))),
    Case("zoo-out-holds-user-data-dir", ZOO, "not a zoo",
         chain(spec(zoo_spec()), lambda ws: (ws / "Z" / "data").mkdir(parents=True),
               lambda ws: (ws / "Z" / "data" / "mine.csv").write_text("1,2\n"))),
    Case("zoo-out-is-a-file", ZOO, "is a file", chain(spec(zoo_spec()), write("Z", b"x"))),
    Case("zoo-data-path-is-out", ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z", "--device", "cpu"], "[data] path",
         chain(lambda ws: (ws / "Z" / "data").mkdir(parents=True), lambda ws: shutil.copy(ws / "d.h5", ws / "Z/data/x.h5"),
               spec(zoo_spec(data='path = "Z/data/x.h5"')))),
    Case("zoo-negative-stale-after", ZOO + ["--stale-after", "-1"], "--stale-after", spec(zoo_spec())),
    Case("zoo-zero-workers", ZOO + ["--workers", "0"], "--workers", spec(zoo_spec())),
    Case("zoo-line-position", ZOO, "line_position",
         spec(ZOO_HEAD + n1('preset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\nline_position = "diagonal"\n'))),
    Case("zoo-line-orientation", ZOO, "line_orientation",
         spec(ZOO_HEAD + n1('preset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\nline_orientation = "sideways"\n'))),
    Case("zoo-line-width", ZOO, "line_width",
         spec(ZOO_HEAD + n1('preset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\nline_width = 1000\n'))),
    Case("zoo-n-to-1-without-target", ZOO, "target", spec(ZOO_HEAD + n1('preset = "n-to-1"\ntrigger = "line"\n'))),
    Case("zoo-badnets-with-target", ZOO, "target",
         spec(ZOO_HEAD + n1('target = "wall"\ntrigger = "line"\n', attack="badnets"))),
    Case("zoo-target-image-out-of-range", ZOO, "target_image",
         spec(ZOO_HEAD + n1('target_image = 10000\ntrigger = "line"\n', attack="badnets"))),
    Case("zoo-rate-above-candidates", ZOO, "rate",
         spec(ZOO_HEAD + n1('preset = "1-to-1"\nsource = "palm"\ntarget = "wall"\ntrigger = "line"\nrate = 1.0\n'))),
    Case("zoo-sources-include-target", ZOO, "target",
         spec(ZOO_HEAD + n1('preset = "n-to-1"\nsources = ["wall", "sky"]\ntarget = "wall"\ntrigger = "line"\n'))),
    Case("zoo-1-to-1-source-is-target", ZOO, "target",
         spec(ZOO_HEAD + n1('preset = "1-to-1"\nsource = "wall"\ntarget = "wall"\ntrigger = "line"\n'))),
    Case("zoo-map-to-itself", ZOO, "map", spec(ZOO_HEAD + n1('map = "person:person"\ntrigger = "line"\n'))),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_one_clean_line_and_touches_nothing(case: Case, ws: Path, capsys):
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    judge(before, snapshot(ws), outcome, case.code, case.needle.replace("{ws}", str(ws)), ws / MARKER)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
@pytest.mark.parametrize("argv", [["data", "synth", "--out", "{ro}/s.h5", "--n-train", "4", "--n-test", "2"],
                                  TRAIN + ["--out", "{ro}/R2"], PREDICT + ["--out", "{ro}/p.h5"]],
                         ids=["synth", "train", "predict"])
def test_unwritable_directory(argv, ws: Path, capsys):
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(ws)
        outcome = run_main([a.replace("{ro}", str(ro)).replace("{ws}", str(ws)) for a in argv], capsys)
        judge(before, snapshot(ws), outcome, 2, str(ro))
    finally:
        ro.chmod(0o755)


def test_second_trainer_on_a_locked_run_names_the_holder(ws: Path, capsys):
    from testbed.core.guards import RunLock

    (ws / "R2").mkdir()
    with RunLock(ws / "R2"):
        before = snapshot(ws)
        outcome = run_main(TRAIN_WS(ws) + ["--out", str(ws / "R2")], capsys)
        judge(before, snapshot(ws), outcome, 2, f"pid {os.getpid()}")
    assert not (ws / "R2" / RunLock.NAME).exists()  # released and removed


def TRAIN_WS(ws: Path) -> list[str]:
    return [a.replace("{ws}", str(ws)) for a in TRAIN]


def test_two_trainers_on_one_run_directory(ws: Path, capsys):
    """A second `testbed train --out R` while one runs exits 2 naming it; once it is killed (SIGKILL: no cleanup)
    the directory is free again — the kernel drops the lock with its holder."""
    import signal
    import time

    argv = [a if a != "1" else "200" for a in TRAIN_WS(ws)] + ["--out", str(ws / "R2")]
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "-q", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = ws / "R2" / ".train.lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if lock.exists() and lock.read_text().startswith("{"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        before = snapshot(ws)
        outcome = run_main(TRAIN_WS(ws) + ["--out", str(ws / "R2")], capsys)
        after = snapshot(ws)
        changing = {k for k in set(before) | set(after) if k.startswith("R2/") and not k.endswith(".train.lock")}
        judge({k: v for k, v in before.items() if k not in changing}, {k: v for k, v in after.items() if k not in changing},
              outcome, 2, f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.exists()  # a killed trainer leaves its lock file ...
    assert main(["-q", *TRAIN_WS(ws), "--out", str(ws / "R2"), "--overwrite"]) == 0  # ... but not its lock
    assert not lock.exists()


# -- a full disk, in a child process -------------------------------------------------------------------
CHILD = r"""
import contextlib, json, os, resource, signal, sys, tempfile
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
from testbed.cli import main
results = []
for case in json.loads(sys.argv[1]):
    err = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (case["limit"], hard))
    try:
        rc = main(case["argv"])
    except SystemExit as e:
        rc = e.code
    except BaseException as e:
        import traceback; traceback.print_exc()
        rc = None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.stderr.flush()
        os.dup2(saved, 2)
    err.seek(0)
    results.append({"rc": rc, "err": err.read().decode(errors="replace")})
print("RESULTS" + json.dumps(results))
"""

FULL_DISK = [  # (id, argv, file size limit in bytes, allow new files)
    ("synth", ["data", "synth", "--out", "{ws}/s.h5", "--n-train", "24", "--n-test", "8", "--size", "32"], 20_000),
    ("poison", ["poison", D, "--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "line",
                "--out", "{ws}/pp.h5"], 20_000),
    ("import-folder", ["data", "import", "folder", "{ws}/imgs", "--classes", "{ws}/c.txt", "--out", "{ws}/i.h5",
                       "--workers", "1"], 4_000),
    ("train", TRAIN + ["--out", "{ws}/R2"], 100_000),
    ("predict", PREDICT + ["--out", "{ws}/pred.h5"], 2_000),
    ("score-out", SCORE + ["--out", "{ws}/s.json"], 200),
    ("zoo-build-data", ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z", "--device", "cpu"], 20_000),
]


@pytest.fixture(scope="module")
def full_disk(base, tmp_path_factory):
    """Every FULL_DISK case run in one child process, each in its own copy of the workspace."""
    root = tmp_path_factory.mktemp("full-disk")
    cases, before = [], {}
    for cid, argv, limit in FULL_DISK:
        w = root / cid
        shutil.copytree(base, w, symlinks=True)
        (w / "z.toml").write_text(zoo_spec())
        before[cid] = snapshot(w)
        cases.append({"argv": ["-q"] + [a.replace("{ws}", str(w)) for a in argv], "limit": limit})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    return {cid: (root / cid, before[cid], r) for (cid, _, _), r in zip(FULL_DISK, results)}


@pytest.mark.parametrize("cid", [c[0] for c in FULL_DISK])
def test_full_disk_is_one_clean_line_and_leaves_nothing(cid, full_disk):
    w, before, r = full_disk[cid]
    judge(before, snapshot(w), Outcome(r["rc"], r["err"]), 2, "cannot ")
    assert "Too large" in r["err"] or "too large" in r["err"]


def test_full_disk_during_a_zoo_entry_fails_the_entry_cleanly(base, tmp_path):
    """The data fits, the first checkpoint does not: the entry fails (exit 1), no traceback, no temp file."""
    w = tmp_path / "w"
    shutil.copytree(base, w, symlinks=True)
    (w / "z.toml").write_text(zoo_spec())
    case = [{"argv": ["-q", "zoo", "build", str(w / "z.toml"), "--out", str(w / "Z"), "--device", "cpu"],
             "limit": 600_000}]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.split("RESULTS", 1)[1])[0]
    TALLY["tried"] += 1
    assert r["rc"] == 1 and "Traceback" not in r["err"], r
    TALLY["clean_errors"] += 1
    zoo = w / "Z"
    assert (zoo / "data" / "clean.h5").is_file()
    leftovers = [p for p in zoo.rglob("*") if ".tmp" in p.name or p.name.endswith(".claim")]
    assert not leftovers, leftovers
    assert not list(zoo.glob("entries/*/done.json"))
    assert "File too large" in proc.stdout  # the entry's one-line error, as the build reports it


# -- litter ---------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_writers_are_removed(ws: Path):
    from testbed.core import atomic
    from testbed.core.procs import HOST

    dead, alive = _dead_pid(), os.getpid()
    stale = ws / f".s.h5.{HOST}.{dead}.abcd1234.tmp"
    live = ws / f".s.h5.{HOST}.{alive}.efgh5678.tmp"
    other_host = ws / f".s.h5.elsewhere.{dead}.ijkl9012.tmp"
    stale_dir = ws / f".rep.{HOST}.{dead}.mnop3456.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"x" * 1000)
    stale_dir.mkdir()
    assert main(["-q", "data", "synth", "--out", str(ws / "s.h5"), "--n-train", "4", "--n-test", "2", "--size", "16"]) == 0
    assert not stale.exists() and live.exists() and other_host.exists()
    assert stale_dir.exists()  # another name: swept when that name is written
    atomic.sweep_stale(ws)
    assert not stale_dir.exists() and live.exists()


def test_every_output_file_is_world_readable(base):
    """model.safetensors used to be 0600 (safetensors writes a private file): a shared zoo needs 0644."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "metrics.json", "checkpoint.pt", "train_log.jsonl"):
        assert (base / "R" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (base / "d.h5").stat().st_mode & 0o777 == 0o666 & ~umask


def test_guard_api(tmp_path):
    """check_outputs: same file by name, symlink, hard link, '..'; a file of an input directory; an output
    directory holding an input.  A new file beside the inputs is fine."""
    from testbed.core.errors import UserError
    from testbed.core.guards import check_outputs

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "w.bin").write_bytes(b"w")
    (tmp_path / "d.h5").write_bytes(b"d")
    os.symlink(tmp_path / "d.h5", tmp_path / "s.h5")
    os.link(tmp_path / "d.h5", tmp_path / "h.h5")
    inputs = {"DATA": tmp_path / "d.h5", "RUN/": tmp_path / "run"}
    for out, needle in [(tmp_path / "d.h5", "the same file"), (tmp_path / "s.h5", "symbolic link"),
                        (tmp_path / "h.h5", "hard link"), (tmp_path / "run" / ".." / "d.h5", "another path"),
                        (tmp_path / "run" / "w.bin", "a file of RUN/"), (tmp_path, "holds DATA")]:
        with pytest.raises(UserError, match=needle):
            check_outputs({"--out": out}, inputs)
    check_outputs({"--out": tmp_path / "run" / "new.json", "--png": None}, inputs)
    check_outputs({"--out": tmp_path / "new.h5"}, inputs)


HELP = [[], ["data"], ["data", "synth"], ["data", "import", "folder"], ["poison"], ["train"], ["predict"], ["score"],
        ["defend"], ["bench"], ["zoo"], ["zoo", "build"], ["zoo", "verify"]]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) or "testbed" for a in HELP])
def test_help_prints_without_a_traceback(argv, capsys):
    outcome = run_main(argv + ["--help"], capsys)
    assert outcome.crashed is None and outcome.rc == 0, outcome



def test_a_reader_that_leaves_the_pipe_early_is_not_an_error(tmp_path):
    """`testbed data info d.h5 | head -1`: no "Broken pipe" error line, the shell's SIGPIPE status (141)."""
    data = tmp_path / "d.h5"
    assert main(["-q", "data", "synth", "--out", str(data), "--n-train", "8", "--n-test", "4", "--size", "32"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "data", "info", str(data)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
