"""Fault suite II (issue 23): hostile files bounded, malformed input one line, claims that cannot block forever.

Each case checks, independently of the code under test, the exit code, exactly one line on stderr, no
traceback, no new file and every file byte-identical (``judge`` of tests/test_faults.py), or — for library
functions — the exception type and its one-line message.  Every case runs in well under 10 s of CPU.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import pytest

from testbed.core import safeload
from testbed.cli import main
from testbed.core.errors import UserError

try:  # the module pytest collected (one TALLY for the whole campaign), not a second copy under tests.
    from test_compare_cli import write_report
    from test_faults import MARKER, TALLY, Case, base, h5_edit, judge, run_main, set_attr, snapshot, ws  # noqa: F401
    from test_stats import noop_oracle_rows
except ImportError:
    from tests.test_compare_cli import write_report
    from tests.test_faults import MARKER, TALLY, Case, base, h5_edit, judge, run_main, set_attr, snapshot, ws  # noqa: F401
    from tests.test_stats import noop_oracle_rows

DEEP = "[" * 100000 + "]" * 100000


# -- claims that name no process --------------------------------------------------------------------
@pytest.mark.parametrize("pid", [0, -1])
def test_a_claim_with_an_impossible_pid_is_stale(pid, tmp_path):
    from testbed.core.procs import HOST
    from testbed.execution.claims import is_stale, read_claim

    path = tmp_path / "e.claim"
    path.write_text(json.dumps({"pid": pid, "host": HOST, "proc_start": None, "started": 0}))
    TALLY["tried"] += 1
    assert is_stale(read_claim(path), stale_after=3600.0)  # same host: judged by pid, not by age
    TALLY["clean_errors"] += 1


@pytest.mark.parametrize("text", ["[1,2]", "null", DEEP, '"x"', "{"])
def test_a_malformed_claim_reads_as_unknown_holder(text, tmp_path):
    from testbed.execution.claims import is_stale, read_claim

    path = tmp_path / "e.claim"
    path.write_text(text)
    info = read_claim(path)
    TALLY["tried"] += 1
    assert text.startswith(info["_raw"]) and set(info) == {"_mtime", "_raw"}  # a huge one is read only in part
    assert not is_stale(info, stale_after=3600.0) and is_stale(info, stale_after=-1.0)  # judged by its age
    TALLY["clean_errors"] += 1


# -- the one JSON loader ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    (DEEP, "nested"), ('{"a": ' * 70 + "1" + "}" * 70, "nested deeper than 64"), ('{"ASR": Infinity}', "Infinity"),
    ('{"ASR": NaN}', "NaN"), ("[1,", "not valid JSON"), ("1" * 5000, "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
])
def test_safe_json_refuses_in_one_line(text, needle, tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as info:
        safeload.load_json(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


def test_safe_json_bounds_size_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(list(range(1000))))
    monkeypatch.setenv("TESTBED_MAX_JSON_BYTES", "100")
    with pytest.raises(UserError, match="TESTBED_MAX_JSON_BYTES"):
        safeload.load_json(path)
    monkeypatch.setenv("TESTBED_MAX_JSON_BYTES", str(1 << 20))
    assert safeload.load_json(path) == list(range(1000))


def test_load_object_one_line_with_the_callers_fix(tmp_path, monkeypatch):
    """The JSON-object loader behind config.json, `score --before` (and bench reports): each problem one line,
    the caller's prefix and fix around it; a real object comes back as parsed."""
    fix = "re-create the run"
    cases = {"list.json": ("[1, 2]", "does not hold a JSON object"), "bad.json": ('{"a": NaN}', "NaN"),
             "deep.json": ("[" * 70 + "]" * 70, "nested deeper")}
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as info:
            safeload.load_object(tmp_path / name, fix, prefix="--before ")
        msg = str(info.value)
        assert msg.startswith("--before ") and needle in msg and str(tmp_path / name) in msg, msg
        assert msg.endswith("; " + fix) and "\n" not in msg
    with pytest.raises(UserError, match="no such file; re-create"):
        safeload.load_object(tmp_path / "missing.json", fix)
    (tmp_path / "ok.json").write_text('{"model": "x", "n": [1, 2]}')
    assert safeload.load_object(tmp_path / "ok.json", fix) == {"model": "x", "n": [1, 2]}
    monkeypatch.setenv("TESTBED_MAX_JSON_BYTES", "10")  # bounded like every other read
    with pytest.raises(UserError, match="TESTBED_MAX_JSON_BYTES"):
        safeload.load_object(tmp_path / "ok.json", fix)


def test_safe_json_depth_limit_is_exact_and_overridable(monkeypatch):
    assert safeload.loads("[" * 64 + "]" * 64, "x") is not None  # 64 levels: allowed
    with pytest.raises(UserError):
        safeload.loads("[" * 65 + "]" * 65, "x")
    monkeypatch.setenv("TESTBED_MAX_JSON_DEPTH", "200")
    assert safeload.loads("[" * 65 + "]" * 65, "x") is not None


def test_field_checks_types_and_finiteness():
    doc = {"n": 3, "b": True, "f": 1.5, "s": "x"}
    assert safeload.field(doc, "n", int, "f.json") == 3
    assert safeload.field(doc, "gone", int, "f.json", default=None) is None
    for key, types in (("b", int), ("s", (int, float)), ("n", str), ("gone", int)):
        with pytest.raises(UserError, match=f"f.json: field '{key}'"):
            safeload.field(doc, key, types, "f.json")
    with pytest.raises(UserError, match="must be a finite number"):
        safeload.number(1e308 * 10, "DER")
    assert safeload.number(1e308, "DER", limit=1e309) == 1e308
    with pytest.raises(UserError, match="at most"):
        safeload.number(1e308, "DER")


# -- malformed input through the command line: one line, exit 2, nothing written -----------------------
D, P, R = "{ws}/d.h5", "{ws}/p.h5", "{ws}/R"
SCORE = ["score", R, "--data", D, "--device", "cpu"]


def write(rel: str, text: str):
    def setup(ws: Path) -> None:
        (ws / rel).write_text(text)

    return setup


def report(edit, n: int = 12):
    """A bench report (the noop/oracle rows of test_stats) at ws/rep/ with ``edit`` applied to its rows."""
    def setup(ws: Path) -> None:
        rows = noop_oracle_rows(n)
        edit(rows)
        write_report(ws / "rep", rows)
        text = (ws / "rep" / "results.json").read_text()
        (ws / "rep" / "results.json").write_text(text.replace('"DER": 1e999', '"DER": Infinity'))

    return setup


def _set(key, value, every: bool = False):
    def edit(rows):
        for r in rows if every else rows[:1]:
            r[key] = value

    return edit


COMPARE = ["compare", "{ws}/rep", "--defense", "oracle", "--vs", "noop"]
CASES = [
    Case("attack-attr-a-list", ["data", "info", P], "attribute 'attack' must be a JSON object",
         h5_edit("p.h5", set_attr("attack", "[1, 2]"))),
    Case("attack-attr-deep", ["data", "info", P], "attribute 'attack': nested", h5_edit("p.h5", set_attr("attack", DEEP))),
    Case("source-attr-deep", SCORE, "attribute 'source': nested", h5_edit("d.h5", set_attr("source", DEEP))),
    Case("config-json-deep", SCORE, "config.json: nested", write("R/config.json", DEEP)),
    Case("before-deep", SCORE + ["--before", "{ws}/b.json"], "--before", write("b.json", DEEP)),
    Case("before-infinity-json", SCORE + ["--before", "{ws}/b.json", "--json"], "Infinity",
         write("b.json", '{"ASR": Infinity, "mIoU-B": 50.0}')),
    Case("before-1e308", SCORE + ["--before", "{ws}/b.json", "--json"], "finite numeric 'ASR'",
         write("b.json", '{"ASR": 1e308, "mIoU-B": 50.0}')),
    Case("results-json-deep", COMPARE, "nested", lambda ws: ((ws / "rep").mkdir(), write("rep/results.json", DEEP)(ws))),
    Case("compare-before-a-list", COMPARE, "field 'before' must be an object", report(_set("before", [1, 2]))),
    Case("compare-after-a-string", COMPARE, "field 'after' must be an object", report(_set("after", "high"))),
    Case("compare-der-infinity-json", COMPARE + ["--json"], "Infinity", report(_set("DER", 1e999))),
    Case("compare-der-1e308", COMPARE, "magnitude at most", report(_set("DER", 1e308, every=True))),
    Case("compare-seed-negative-21-models", COMPARE + ["--seed", "-1"], "--seed", report(lambda rows: None, n=24)),
    Case("train-seed-2-64", ["train", D, "--model", "deeplabv3_tiny", "--out", "{ws}/R2", "--seed",
                             str(2**64)], "--seed"),
    Case("zoo-spec-nested-toml", ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z"], "nested",
         write("z.toml", "x = " + "[" * 5000 + "]" * 5000 + "\n")),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_malformed_input_is_one_clean_line_and_touches_nothing(case, ws: Path, capsys):
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    judge(before, snapshot(ws), outcome, case.code, case.needle.replace("{ws}", str(ws)), ws / MARKER)


# -- hostile HDF5 files: bounded work before anything is read -------------------------------------------
def declared(rows: int, size: int = 32, image_size: tuple[int, int] | None = None):
    """ws/big.h5: d.h5's attributes, every split declaring ``rows`` rows of size² images, chunked, nothing written
    (a file of a few KB)."""
    def setup(ws: Path) -> None:
        with h5py.File(ws / "d.h5", "r") as src, h5py.File(ws / "big.h5", "w") as f:
            for k, v in src.attrs.items():
                f.attrs[k] = v
            f.attrs["image_size"] = json.dumps(list(image_size or (size, size)))
            h, w = image_size or (size, size)
            for split in ("train", "test"):
                f.create_dataset(f"{split}/images", shape=(rows, h, w, 3), dtype="u1", chunks=(1, min(h, 64), min(w, 64), 3))
                f.create_dataset(f"{split}/labels", shape=(rows, h, w), dtype="u1", chunks=(1, min(h, 64), min(w, 64)))
        assert (ws / "big.h5").stat().st_size < 16 << 10

    return setup


BIG = "{ws}/big.h5"
HOSTILE = [
    Case("info-1e9-declared-rows", ["data", "info", BIG], "stores 0 chunk(s)", declared(10**9)),
    Case("train-1e9-declared-rows", ["train", BIG, "--model", "deeplabv3_tiny", "--out", "{ws}/R9", "--device", "cpu"],
         "stores 0 chunk(s)", declared(10**9)),
    Case("score-1e9-declared-rows", ["score", R, "--data", BIG, "--device", "cpu"], "stores 0 chunk(s)", declared(10**9)),
    Case("zoo-build-1e9-declared-rows", ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z"], "stores 0 chunk(s)",
         lambda ws: (declared(10**9)(ws), write("z.toml", '[data]\npath = "big.h5"\n[[attack]]\nid = "benign"\n'
                                                          '[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["benign"]\n')(ws))),
    Case("show-huge-declared-image", ["data", "show", BIG, "--out", "{ws}/s.png"], "TESTBED_MAX_IMAGE_PIXELS",
         declared(1, image_size=(100000, 100000))),
]


@pytest.mark.parametrize("case", [c.param() for c in HOSTILE])
def test_hostile_hdf5_is_refused_in_bounded_time(case, ws: Path, capsys):
    import time

    case.setup(ws)
    before = snapshot(ws)
    t0 = time.process_time()
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    assert time.process_time() - t0 < 10
    judge(before, snapshot(ws), outcome, case.code, case.needle, ws / MARKER)


def test_a_partly_written_array_is_refused_and_a_whole_one_read(ws: Path):
    """The stored-chunk rule against an independent count: one chunk missing is refused, all present is fine."""
    from testbed.data.h5data import open_dataset, stored_problem

    with h5py.File(ws / "d.h5", "r") as f:
        assert all(stored_problem(f[n]) is None for n in ("train/images", "train/labels", "test/images"))
    with h5py.File(ws / "d.h5", "a") as f:
        x = f["train/images"][()]
        del f["train/images"]
        ds = f.create_dataset("train/images", shape=x.shape, dtype="u1", chunks=(1,) + x.shape[1:])
        ds[: len(x) - 1] = x[:-1]  # the last row never written
    with pytest.raises(UserError, match=re.escape(f"declares {x.shape} ({len(x)} chunks) but stores {len(x) - 1} chunk")):
        open_dataset(ws / "d.h5")


def test_image_pixel_limit_is_overridable(ws: Path, monkeypatch):
    from testbed.data.h5data import open_dataset

    monkeypatch.setenv("TESTBED_MAX_IMAGE_PIXELS", str(32 * 32 - 1))
    with pytest.raises(UserError, match="TESTBED_MAX_IMAGE_PIXELS"):
        open_dataset(ws / "d.h5")
    monkeypatch.setenv("TESTBED_MAX_IMAGE_PIXELS", str(32 * 32))
    with open_dataset(ws / "d.h5") as f:
        assert f.image_size == (32, 32)


# -- weights: dtype and finiteness checked on load ---------------------------------------------------------
def weights_edit(edit, config_edit=None):
    def setup(ws: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(ws / "R" / "model.safetensors"))
        save_file(edit(state), str(ws / "R" / "model.safetensors"), metadata={"format": "pt"})
        if config_edit is not None:
            cfg = json.loads((ws / "R" / "config.json").read_text())
            config_edit(cfg)
            (ws / "R" / "config.json").write_text(json.dumps(cfg))

    return setup


def _floats(dtype):
    return lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _poke(value):
    def edit(state):
        k = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[k] = state[k].clone()
        state[k].view(-1)[1] = value
        return state

    return edit


WEIGHTS = [
    Case("weights-float16", SCORE, "is float16, the model holds float32", lambda ws: weights_edit(_floats(_torch().float16))(ws)),
    Case("weights-int8", SCORE, "is int8, the model holds float32", lambda ws: weights_edit(_floats(_torch().int8))(ws)),
    Case("weights-nan", SCORE, "NaN or infinite", lambda ws: weights_edit(_poke(float("nan")))(ws)),
    Case("weights-inf", SCORE, "NaN or infinite", lambda ws: weights_edit(_poke(float("inf")))(ws)),
    Case("weights-bfloat16-config-says-float16", SCORE, "(config.json says float16)",
         lambda ws: weights_edit(_floats(_torch().bfloat16), lambda c: c.update(weights_dtype="float16"))(ws)),
]


def _torch():
    import torch

    return torch


@pytest.mark.parametrize("case", [c.param() for c in WEIGHTS])
def test_converted_or_damaged_weights_are_one_line(case, ws: Path, capsys):
    case.setup(ws)
    before = snapshot(ws)
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    judge(before, snapshot(ws), outcome, case.code, case.needle, ws / MARKER)


def test_half_weights_load_where_the_config_says_so(ws: Path):
    import torch

    from testbed.training.runs import load_run

    weights_edit(_floats(torch.float16), lambda c: c.update(weights_dtype="float16"))(ws)
    model, _ = load_run(ws / "R")
    assert next(model.parameters()).dtype == torch.float32  # loaded into the float32 model, values rounded


# -- the whole zoo spec is checked before anything is written ----------------------------------------------
def spec(text: str, extra=None):
    def setup(ws: Path) -> None:
        (ws / "z.toml").write_text(text)
        if extra is not None:
            extra(ws)

    return setup


def _spec_text(attack_id: str = "n1", train: str = "") -> str:
    return ('[data]\nsynth = { n_train = 8, n_test = 4, size = 32, seed = 0 }\n[train]\nepochs = 1\n' + train +
            f'[[attack]]\nid = "{attack_id}"\nattack = "fgba"\npreset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\n'
            f'[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["{attack_id}"]\n')


def _pickle_file(ws: Path) -> None:
    import pickle

    from test_faults import Boom

    (ws / "bb.safetensors").write_bytes(pickle.dumps(Boom(ws / MARKER)))


BUILD = ["zoo", "build", "{ws}/z.toml", "--out", "{ws}/Z", "--device", "cpu"]
SPECS = [
    Case("spec-attack-id-dotdot", BUILD, "[[attack]] id '..'", spec(_spec_text(".."))),
    Case("spec-attack-id-dot-dash", BUILD, "[[attack]] id '.-.'", spec(_spec_text(".-."))),
    Case("spec-backbone-weights-missing", BUILD, "backbone_weights file", spec(_spec_text(train='backbone_weights = "nope.safetensors"\n'))),
    Case("spec-backbone-weights-a-pickle", BUILD, "looks like a pickle",
         spec(_spec_text(train='backbone_weights = "{ws}/bb.safetensors"\n'), _pickle_file)),
]


@pytest.mark.parametrize("case", [c.param() for c in SPECS])
def test_a_bad_zoo_spec_writes_nothing(case, ws: Path, capsys):
    case.setup(ws)
    text = (ws / "z.toml").read_text().replace("{ws}", str(ws))
    (ws / "z.toml").write_text(text)
    before = snapshot(ws)
    outcome = run_main([a.replace("{ws}", str(ws)) for a in case.argv], capsys)
    judge(before, snapshot(ws), outcome, case.code, case.needle, ws / MARKER)
    assert not (ws / "Z").exists()


# -- out of memory, Ctrl-C: one line, the right exit code, nothing partial --------------------------------
def _oom(kind: str):
    import torch

    return {"host": MemoryError(), "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            "mps": RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")}[kind]


@pytest.mark.parametrize("kind", ["host", "cuda", "mps"])
def test_out_of_memory_while_scoring_is_one_line(kind, ws: Path, capsys, monkeypatch):
    import testbed.scoring.scorer as scorer

    def boom(*a, **k):
        raise _oom(kind)

    monkeypatch.setattr(scorer, "score_model", boom)
    before = snapshot(ws)
    outcome = run_main(["score", f"{ws}/R", "--data", f"{ws}/d.h5", "--device", "cpu", "--out", f"{ws}/m2.json"], capsys)
    judge(before, snapshot(ws), outcome, 2, "out of memory")


def test_out_of_memory_while_training_leaves_nothing(ws: Path, capsys, monkeypatch):
    import testbed.models as models

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(models, "create", boom)
    before = snapshot(ws)
    outcome = run_main(["train", f"{ws}/d.h5", "--model", "deeplabv3_tiny", "--out", f"{ws}/R3", "--device", "cpu"],
                       capsys)
    judge(before, snapshot(ws), outcome, 2, "out of memory")


def test_ctrl_c_while_the_commands_import_is_exit_130(capsys, monkeypatch):
    import testbed.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["zoo", "build", "x.toml", "--out", "z"]) == 130
    err = capsys.readouterr().err
    TALLY["tried"] += 1
    assert err == "testbed: interrupted\n"
    TALLY["clean_errors"] += 1


def test_a_runtime_error_that_is_not_memory_still_raises(monkeypatch):
    import testbed.cli as cli

    assert cli.out_of_memory(RuntimeError("shape mismatch")) is None
    assert cli.out_of_memory(MemoryError()) is not None


# -- a valid long file name is written (its temporary name stays within the limit) ---------------------------
def test_a_243_character_output_name_is_written_atomically(ws: Path, capsys):
    from testbed.core import atomic

    name = "m" * 238 + ".json"  # 243 characters: a valid name, longer than room for its temporary name
    outcome = run_main(["score", f"{ws}/R", "--data", f"{ws}/d.h5", "--device", "cpu", "--out", f"{ws}/{name}"], capsys)
    TALLY["tried"] += 1
    assert outcome.rc == 0 and outcome.crashed is None, outcome
    assert json.loads((ws / name).read_text())["mIoU-B"] is not None
    assert len(atomic.temp_prefix(name).encode()) + 24 <= 255
    assert not [p for p in os.listdir(ws) if p.startswith(".")]  # no temporary left behind
    TALLY["clean_errors"] += 1


def test_stale_temporaries_of_long_names_are_swept(tmp_path):
    import subprocess
    import sys

    from testbed.core import atomic
    from testbed.core.procs import HOST

    name = "x" * 243
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".{atomic.temp_stem(name)}.{HOST}.{p.pid}.abc.tmp"
    stale.write_text("partial")
    assert atomic.sweep_stale(tmp_path, name) == [stale] and not stale.exists()


# -- provenance by content -----------------------------------------------------------------------------------
def test_a_byte_identical_copy_of_the_training_data_is_the_same_data(ws: Path, capsys):
    import shutil

    shutil.copy(ws / "d.h5", ws / "copy.h5")
    assert main(["-q", "score", f"{ws}/R", "--data", f"{ws}/copy.h5", "--device", "cpu"]) == 0
    assert "note:" not in capsys.readouterr().err  # same content: not "trained on another file"
    assert main(["-q", "score", f"{ws}/R", "--data", f"{ws}/p.h5", "--device", "cpu"]) == 0
    assert "note:" in capsys.readouterr().err  # other content: said
