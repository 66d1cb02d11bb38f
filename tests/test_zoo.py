"""Model zoo: spec parsing and validation, builds that survive SIGKILL and concurrent builders, verify, Ray.

Tiny zoos (32×32 synthetic scenes, 48 training images, 2–3 epochs) so the whole file stays near a minute
of training; the crash and concurrency tests run real `testbed zoo build` processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testbed.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "zoo-small.toml"

TINY = """
[data]
synth = {{ n_train = 48, n_test = 16, size = 32, seed = 0 }}
[train]
epochs = {epochs}
batch_size = 16
[[attack]]
id = "benign"
[[attack]]
id = "n1"
attack = "fgba"
preset = "n-to-1"
target = "wall"
trigger = "line"
rate = 0.25
[grid]
model = ["deeplabv3_tiny"]
attack = {attacks}
seed = [0]
"""


def tiny_spec(tmp: Path, epochs: int = 2, attacks: str = '["benign", "n1"]', name: str = "zoo.toml") -> Path:
    p = tmp / name
    p.write_text(TINY.format(epochs=epochs, attacks=attacks))
    return p


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def builder(spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", "-q", "zoo", "build", str(spec), "--out", str(out),
                             "--device", "cpu", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def zoo_log(zoo: Path, eid: str) -> list[dict]:
    return [json.loads(line) for line in (zoo / "entries" / eid / "zoo_log.jsonl").read_text().splitlines()]


def train_epochs(zoo: Path, eid: str) -> list[int]:
    return [json.loads(line)["epoch"] for line in (zoo / "entries" / eid / "train_log.jsonl").read_text().splitlines()]


# -- the spec ---------------------------------------------------------------------------------------
def test_spec_example_gives_the_twelve_entries():
    from testbed.zoo.spec import parse_spec

    spec = parse_spec(EXAMPLE)
    expected = [f"{m}--{a}--s{s}" for m, a, s in itertools.product(
        ["deeplabv3_tiny", "danet_tiny"], ["benign", "fgba-n1-line", "fgba-11-wall"], [0, 1])]
    assert [e.id for e in spec.entries] == expected
    by_id = {e.id: e for e in spec.entries}
    e = by_id["danet_tiny--fgba-n1-line--s1"]
    assert (e.model, e.attack_id, e.seed, e.is_benign) == ("danet_tiny", "fgba-n1-line", 1, False)
    assert e.definition()["attack"] == {"attack": "fgba", "preset": "n-to-1", "target": "wall", "trigger": "line",
                                        "rate": 0.1, "seed": 1}
    assert e.train == {"epochs": 8, "batch_size": 16, "model": "danet_tiny", "seed": 1}
    semantic = by_id["deeplabv3_tiny--fgba-11-wall--s0"].definition()["attack"]
    assert semantic == {"attack": "fgba", "preset": "1-to-1", "source": "person", "target": "palm",
                        "trigger": "semantic:wall", "seed": 0}
    assert by_id["deeplabv3_tiny--benign--s1"].is_benign and by_id["deeplabv3_tiny--benign--s1"].definition()["attack"] is None
    assert spec.data == {"synth": {"n_train": 1000, "n_test": 200, "size": 64, "seed": 0}}


def test_paper_spec_is_valid():
    """examples/zoo-paper.toml (ADE20K, GPU cluster) is not built here, but it must parse: data swapped for synth."""
    from testbed.zoo.spec import parse_spec

    paper = REPO / "examples" / "zoo-paper.toml"
    text = paper.read_text()
    assert 'path = "ade20k-512.h5"' in text
    spec = parse_spec(paper, text.replace('path = "ade20k-512.h5"', "synth = { n_train = 8 }"))
    models_ = ["deeplabv3_resnet50", "denseaspp_densenet121", "danet_resnet50"]
    attacks_ = ["benign", "badnets-line", "badnets-grass", "fgba-n1-line", "fgba-n1-wall", "fgba-11-line", "fgba-11-wall"]
    assert [e.id for e in spec.entries] == [f"{m}--{a}--s0" for m in models_ for a in attacks_]
    assert spec.train["batch_size"] == 4


def test_grid_rate_and_trigger_axes_multiply_attacks_not_benign(tmp_path):
    from testbed.zoo.spec import parse_spec

    p = tiny_spec(tmp_path)
    p.write_text(p.read_text().replace("seed = [0]\n", 'seed = [0]\nrate = [0.1, 0.2]\ntrigger = ["line", "semantic:grass"]\n'))
    spec = parse_spec(p)
    ids = [e.id for e in spec.entries]
    expected = ["deeplabv3_tiny--benign--s0"] + [
        f"deeplabv3_tiny--n1-r{r}-t{t}--s0" for r, t in itertools.product(["0.1", "0.2"], ["line", "semantic_grass"])]
    assert ids == expected
    e = spec.entries[-1]
    assert e.definition()["attack"]["rate"] == 0.2 and e.definition()["attack"]["trigger"] == "semantic:grass"

    p.write_text(p.read_text().replace("epochs = 2\n", "").replace("seed = [0]\n", "seed = [0]\nepochs = [1, 3]\nlr = [0.01]\n"))
    spec = parse_spec(p)
    assert [e.id for e in spec.entries][:2] == ["deeplabv3_tiny--benign--s0--epochs-1--lr-0.01",
                                                 "deeplabv3_tiny--benign--s0--epochs-3--lr-0.01"]
    assert len(spec.entries) == 2 * 5
    assert spec.entries[1].train == {"batch_size": 16, "epochs": 3, "lr": 0.01, "model": "deeplabv3_tiny", "seed": 0}


BAD_SPECS = {
    "unknown-key": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "a"\nattack = "fgba"\npreset = "n-to-1"\n'
                    'traget = "wall"\ntrigger = "line"\n[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["a"]\n',
                    ["'traget'", "did you mean 'target'"]),
    "unknown-top": ('[data]\nsynth = { n_train = 48 }\n[gird]\nmodel = 1\n', ["'gird'", "did you mean 'grid'"]),
    "unknown-train-key": ('[data]\nsynth = { n_train = 48 }\n[train]\nepocs = 2\n[[attack]]\nid = "benign"\n'
                          '[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["benign"]\n', ["'epocs'", "did you mean 'epochs'"]),
    "unknown-model": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "benign"\n[grid]\nmodel = ["deeplabv3_tiney"]\n'
                      'attack = ["benign"]\n', ["unknown model 'deeplabv3_tiney'", "deeplabv3_tiny"]),
    "unknown-class": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "a"\nattack = "fgba"\npreset = "n-to-1"\n'
                      'target = "wal"\ntrigger = "line"\n[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["a"]\n',
                      ["unknown class 'wal'", "did you mean 'wall'"]),
    "unknown-trigger-class": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "a"\nattack = "badnets"\n'
                              'trigger = "semantic:gras"\n[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["a"]\n',
                              ["unknown class 'gras'"]),
    "undefined-attack": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "benign"\n[grid]\nmodel = ["deeplabv3_tiny"]\n'
                         'attack = ["benign", "fgba-n1"]\n', ["'fgba-n1' is not defined", "[[attack]]"]),
    "duplicate-id": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "benign"\n[[attack]]\nid = "benign"\n'
                     '[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["benign"]\n', ["duplicate [[attack]] id 'benign'"]),
    "missing-data-file": ('[data]\npath = "nowhere/ade.h5"\n[[attack]]\nid = "benign"\n[grid]\nmodel = ["deeplabv3_tiny"]\n'
                          'attack = ["benign"]\n', ["'nowhere/ade.h5' is not a readable file"]),
    "toml-syntax": ('[data]\nsynth = { n_train = 48 }\n[train]\nepochs = = 2\n', ["TOML syntax error", "line 4"]),
    "train-in-both": ('[data]\nsynth = { n_train = 48 }\n[train]\nepochs = 2\n[[attack]]\nid = "benign"\n[grid]\n'
                      'model = ["deeplabv3_tiny"]\nattack = ["benign"]\nepochs = [1, 2]\n', ["epochs is in both [train] and [grid]"]),
    "bad-train-value": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "benign"\n[grid]\n'
                        'model = ["deeplabv3_tiny"]\nattack = ["benign"]\nepochs = [0]\n', ["--epochs must be an integer >= 1"]),
    "benign-with-keys": ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "benign"\nrate = 0.1\n[grid]\n'
                         'model = ["deeplabv3_tiny"]\nattack = ["benign"]\n', ["takes no other keys", "rate"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_with_one_line_and_no_output(case, tmp_path, capsys):
    text, needles = BAD_SPECS[case]
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    out = tmp_path / "zoo"
    assert main(["zoo", "build", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("testbed: error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


IBA_SPEC = ('[data]\nsynth = { n_train = 48 }\n[[attack]]\nid = "a"\nattack = "%s"\nsource = "person"\n'
            'target = "wall"\n%s\n[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["a"]\n')


def _spec_error(tmp_path: Path, capsys, text: str) -> str:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert main(["zoo", "build", str(spec), "--out", str(tmp_path / "zoo")]) == 2
    assert not (tmp_path / "zoo").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_the_iba_spec_error_lists_only_the_keys_iba_takes(tmp_path, capsys):
    """IBA places its own trigger: neither ``trigger`` nor any trigger option is a key it takes."""
    from testbed.attacks.registry import attack_class, params_doc
    from testbed.attacks.triggers import trigger_options

    own = {p.key_for(n) for n, p in params_doc(attack_class("iba")).items()}
    trigger_keys = {"trigger"} | {p.key_for(n) for n, p in trigger_options().items()}
    run_keys = {"id", "attack", "rate", "seed", "clean_fraction", "require"}
    err = _spec_error(tmp_path, capsys, IBA_SPEC % ("iba", "patch_sz = 4"))
    assert "did you mean 'patch_size'" in err
    assert set(err.split("valid keys for attack iba: ")[1].split(", ")) == own | run_keys
    err = _spec_error(tmp_path, capsys, IBA_SPEC % ("iba", 'trigger = "line"'))
    assert "'trigger' cannot be used in [[attack]] 'a': attack iba places its own trigger" in err
    err = _spec_error(tmp_path, capsys, IBA_SPEC % ("iba", "line_width = 2"))
    assert "'line_width' cannot be used" in err and "line_width, " not in err.split("valid keys")[1]
    # an attack that takes a trigger still lists the trigger's keys
    err = _spec_error(tmp_path, capsys, IBA_SPEC.replace('source = "person"\n', '') % ("badnets", "patch_sz = 4"))
    assert trigger_keys <= set(err.split("valid keys for attack badnets: ")[1].split(", "))


def test_rerun_with_changed_settings_is_refused(tmp_path, capsys):
    from testbed.zoo.build import prepare
    from testbed.zoo.spec import parse_spec

    zoo = tmp_path / "zoo"
    prepare(parse_spec(tiny_spec(tmp_path, epochs=2, attacks='["benign"]')), zoo, say=lambda m: None)
    changed = tiny_spec(tmp_path, epochs=3, attacks='["benign"]', name="changed.toml")
    before = sorted(p.relative_to(zoo) for p in zoo.rglob("*"))
    assert main(["zoo", "build", str(changed), "--out", str(zoo)]) == 2
    err = capsys.readouterr().err
    assert "deeplabv3_tiny--benign--s0 exists with other settings" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(zoo) for p in zoo.rglob("*")) == before


def test_data_path_source_is_copied_into_the_zoo(synth_path, tmp_path):
    from testbed.data.h5data import content_hash
    from testbed.zoo.build import prepare
    from testbed.zoo.spec import parse_spec

    spec = tiny_spec(tmp_path, attacks='["benign"]')
    spec.write_text(spec.read_text().replace("synth = { n_train = 48, n_test = 16, size = 32, seed = 0 }",
                                             f"path = {json.dumps(os.path.relpath(synth_path, tmp_path))}"))
    zoo = tmp_path / "zoo"
    prepare(parse_spec(spec), zoo, say=lambda m: None)
    assert sha256(zoo / "data" / "clean.h5") == sha256(synth_path)
    assert json.loads((zoo / "data" / "clean.json").read_text())["content_hash"] == content_hash(synth_path)


# -- claims ---------------------------------------------------------------------------------------
def test_claims_are_exclusive_and_stale_ones_are_recovered(tmp_path):
    from testbed.execution.claims import HOST, Claim

    a = Claim(tmp_path / "e.claim", tmp_path)
    b = Claim(tmp_path / "e.claim", tmp_path)
    assert a.acquire()
    assert not b.acquire()  # held by a live process (this one)
    assert b.holder["pid"] == os.getpid()
    a.release()
    assert not (tmp_path / "e.claim").exists()
    assert b.acquire()
    b.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is gone
    (tmp_path / "d.claim").write_text(json.dumps({"pid": dead.pid, "host": HOST, "proc_start": None, "started": 0}))
    c = Claim(tmp_path / "d.claim", tmp_path)
    assert c.acquire()
    assert json.loads((tmp_path / "d.claim").read_text())["pid"] == os.getpid()
    c.release()

    # another host: judged by heartbeat age
    other = tmp_path / "o.claim"
    other.write_text(json.dumps({"pid": 1, "host": HOST + "-elsewhere", "started": 0}))
    assert not Claim(other, tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(other, (old, old))
    assert Claim(other, tmp_path, stale_after=60).acquire()


def test_poisoned_datasets_are_shared_by_content(tmp_path):
    """prepare() only (no training): same attack+seed → one file for both models; another seed → another."""
    from testbed.data.h5data import open_dataset
    from testbed.zoo.build import prepare
    from testbed.zoo.spec import parse_spec

    p = tiny_spec(tmp_path)
    p.write_text(p.read_text().replace('model = ["deeplabv3_tiny"]', 'model = ["deeplabv3_tiny", "danet_tiny"]')
                 .replace("seed = [0]", "seed = [0, 1]")
                 .replace('[grid]', '[[attack]]\nid = "n1-again"\nattack = "fgba"\npreset = "n-to-1"\ntarget = "wall"\n'
                          'trigger = "line"\nrate = 0.25\n[grid]')
                 .replace('attack = ["benign", "n1"]', 'attack = ["benign", "n1", "n1-again"]'))
    zoo = tmp_path / "zoo"
    plan = prepare(parse_spec(p), zoo, say=lambda m: None)
    rows = plan["entries"]
    assert len(rows) == 2 * 3 * 2
    data = {eid: row["data"] for eid, row in rows.items()}
    assert data["deeplabv3_tiny--n1--s0"] == data["danet_tiny--n1--s0"] == data["danet_tiny--n1-again--s0"]
    assert data["deeplabv3_tiny--n1--s0"] != data["deeplabv3_tiny--n1--s1"]
    assert data["deeplabv3_tiny--benign--s0"] == "clean"
    files = sorted(x.name for x in (zoo / "data").glob("*.h5"))
    assert len(files) == 3  # clean + one poisoned set per seed
    with open_dataset(zoo / "data" / f"{data['danet_tiny--n1--s1']}.h5") as f:
        assert f.attack["seed"] == 1
        clean_hash = json.loads((zoo / "data" / "clean.json").read_text())["content_hash"]
        assert f.file.attrs["parent_sha256"] == clean_hash
    # a benign entry is scored against the attacked sets of its own seed
    assert rows["danet_tiny--benign--s1"]["reference"] == {"n1": data["danet_tiny--n1--s1"], "n1-again": data["danet_tiny--n1--s1"]}


# -- a build killed with SIGKILL, then resumed ------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_zoo(tmp_path_factory):
    """Kill -9 a builder while the 2nd entry is mid-training (1st finished), then run it again."""
    tmp = tmp_path_factory.mktemp("zoo-kill")
    spec = tiny_spec(tmp, epochs=3)
    zoo = tmp / "zoo"
    first, second = "deeplabv3_tiny--benign--s0", "deeplabv3_tiny--n1--s0"
    proc = builder(spec, zoo)
    log = zoo / "entries" / second / "train_log.jsonl"  # written right after each epoch's checkpoint
    deadline = time.time() + 240
    while not log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = {
        "second_done_at_kill": (zoo / "entries" / second / "done.json").exists(),
        "first_files": {p.name: (sha256(p), p.stat().st_mtime_ns) for p in (zoo / "entries" / first).iterdir() if p.is_file()},
        "second_log": (zoo / "entries" / second / "train_log.jsonl").read_text().splitlines(),
        "claim_left": (zoo / "entries" / f"{second}.claim").exists(),
    }
    rerun = builder(spec, zoo)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    return zoo, spec, first, second, state, out


def test_killed_build_resumes_without_retraining(resumed_zoo):
    zoo, _, first, second, state, out = resumed_zoo
    assert not state["second_done_at_kill"] and state["claim_left"]  # the kill hit mid-entry, claim orphaned
    assert len(state["second_log"]) >= 1  # at least one epoch was checkpointed before the kill
    # the finished entry was left alone
    after = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in (zoo / "entries" / first).iterdir() if p.is_file()}
    assert {k: after[k] for k in state["first_files"]} == state["first_files"]
    assert [r["event"] for r in zoo_log(zoo, first)] == ["start", "finish"]
    # the interrupted entry continued from its checkpoint: earlier epochs' log lines are byte-identical
    lines = (zoo / "entries" / second / "train_log.jsonl").read_text().splitlines()
    assert lines[: len(state["second_log"])] == state["second_log"]
    assert train_epochs(zoo, second) == [1, 2, 3]
    starts = [r for r in zoo_log(zoo, second) if r["event"] == "start"]
    assert [s["resume"] for s in starts] == [False, True]
    assert starts[1]["from_epoch"] == len(state["second_log"])
    assert not (zoo / "entries" / second / "checkpoint.pt").exists()  # not part of a finished entry
    # what the entry cost: done.json and the finish event give the finishing builder's wall and CPU seconds; the
    # run's config.json its training CPU seconds over both processes (the epochs before the kill included)
    done = json.loads((zoo / "entries" / second / "done.json").read_text())
    (finish,) = [r for r in zoo_log(zoo, second) if r["event"] == "finish"]
    assert done["cpu_seconds"] == finish["cpu_seconds"] > 0 and done["seconds"] == finish["seconds"] > 0
    epochs = [json.loads(line) for line in lines]
    config = json.loads((zoo / "entries" / second / "config.json").read_text())
    assert config["training_cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in epochs), abs=1e-3)
    assert "1/2 entries already built" in out
    assert not list((zoo / "entries").glob("*.claim"))


def test_manifest_lists_every_file_with_its_sha256(resumed_zoo):
    zoo, _, first, second, _, _ = resumed_zoo
    m = json.loads((zoo / "manifest.json").read_text())
    assert m["complete"] and [e["id"] for e in m["entries"]] == [first, second]
    for e in m["entries"]:
        run = zoo / "entries" / e["id"]
        on_disk = {f"entries/{e['id']}/{p.name}" for p in run.iterdir() if p.is_file()}
        assert set(e["files"]) == on_disk
        for rel, h in e["files"].items():
            assert h == sha256(zoo / rel)
        assert e["config"]["epochs"] == 3 and e["config"]["model"] == "deeplabv3_tiny"
    for name, rec in m["datasets"].items():
        assert rec["sha256"] == sha256(zoo / rec["file"])
    stripped = {k: v for k, v in m.items() if k != "checksum"}
    canon = json.dumps(stripped, sort_keys=True, separators=(",", ":")).encode()
    assert m["checksum"] == "sha256:" + hashlib.sha256(canon).hexdigest()


def test_python_api_and_scores(resumed_zoo):
    import testbed.zoo
    from testbed.training.runs import load_run
    from testbed.scoring.scorer import score_model

    zoo_dir, _, first, second, _, _ = resumed_zoo
    zoo = testbed.zoo.open(zoo_dir)
    assert len(zoo) == 2 and [e.id for e in zoo] == [first, second]
    benign, attacked = zoo.entry(first), zoo.entry(second)
    assert (benign.model, benign.attack_id, benign.seed, benign.is_benign) == ("deeplabv3_tiny", "benign", 0, True)
    assert (attacked.attack_id, attacked.is_benign) == ("n1", False)
    assert benign.data_path == zoo_dir / "data" / "clean.h5"
    assert attacked.run_dir == zoo_dir / "entries" / second
    assert attacked.config["model"] == "deeplabv3_tiny" and attacked.config["train"]["epochs"] == 3
    model = attacked.load_model("cpu")
    from safetensors.torch import load_file

    weights = load_file(str(attacked.run_dir / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    ref_model, _ = load_run(attacked.run_dir)
    direct = score_model(ref_model, attacked.data_path)
    assert attacked.metrics["ASR"] == pytest.approx(direct["ASR"], abs=1e-9)
    assert attacked.metrics["mIoU-B"] == pytest.approx(direct["mIoU-B"], abs=1e-9)
    # the benign model is scored on the attacked test set too (the paper's "Benign" rows)
    ref = score_model(benign.load_model(), attacked.data_path)
    assert set(benign.metrics["reference"]) == {"n1"}
    assert benign.metrics["reference"]["n1"]["ASR"] == pytest.approx(ref["ASR"], abs=1e-9)
    assert benign.metrics["ASR"] is None
    with pytest.raises(Exception, match="no entry"):
        zoo.entry("nope")


def test_ls_lists_entries(resumed_zoo, capsys):
    zoo, _, first, second, _, _ = resumed_zoo
    assert main(["zoo", "ls", str(zoo)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("deeplabv3_tiny--")]
    assert len(lines) == 2 and lines[0].split()[:5] == [first, "deeplabv3_tiny", "benign", "0", "done"]
    asr = json.loads((zoo / "entries" / second / "metrics.json").read_text())["ASR"]
    ref = json.loads((zoo / "entries" / first / "done.json").read_text())["reference"]["n1"]["ASR"]
    assert lines[1].split()[-2:] == [f"{asr:.1f}", f"{ref:.1f}"]  # ASR, then the benign model's on the same data


def test_ls_says_when_the_benign_model_scores_the_same_asr(resumed_zoo, tmp_path, capsys):
    """An ASR the benign model of the same seed reaches too measures no backdoor (a weak model labelling the
    victim as the target anyway): `zoo ls` says so instead of "implanted"."""
    zoo, _, first, second, _, _ = resumed_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    asr = json.loads((zoo / "entries" / second / "metrics.json").read_text())["ASR"]
    done = json.loads((copy / "entries" / first / "done.json").read_text())
    done["reference"]["n1"]["ASR"] = max(asr, 1.0)  # the benign model as high as the attacked one (a hand edit)
    (copy / "entries" / first / "done.json").write_text(json.dumps(done))
    assert main(["zoo", "ls", str(copy), "--json", "--min-asr", "0"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[second]["benign_ASR"] == max(asr, 1.0) and rows[first]["benign_ASR"] is None
    assert rows[second]["implanted"] == f"NO GAIN (benign {max(asr, 1.0):.1f}%)"
    done["reference"]["n1"]["ASR"] = asr - 0.5  # below: the ASR is the attack's
    (copy / "entries" / first / "done.json").write_text(json.dumps(done))
    assert main(["zoo", "ls", str(copy), "--json", "--min-asr", "0"]) == 0
    assert {r["id"]: r for r in json.loads(capsys.readouterr().out)}[second]["implanted"] == "implanted"


def test_verify_accepts_a_good_zoo_and_names_each_problem(resumed_zoo, tmp_path, capsys):
    zoo, _, first, second, _, _ = resumed_zoo
    assert main(["zoo", "verify", str(zoo)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(zoo, bad)
    w = bad / "entries" / second / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    w.write_bytes(bytes(raw))
    (bad / "entries" / first / "train_log.jsonl").unlink()
    m = json.loads((bad / "manifest.json").read_text())
    m["entries"][1]["metrics"]["mIoU-B"] += 5.0  # a flattering edit
    (bad / "manifest.json").write_text(json.dumps(m, indent=2))
    assert main(["zoo", "verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"entries/{second}/model.safetensors: sha256 mismatch" in out
    assert f"entries/{first}/train_log.jsonl: missing" in out
    assert "manifest.json: tampered" in out
    assert len([line for line in out.splitlines() if line.startswith("FAIL")]) == 3
    with pytest.raises(Exception, match="checksum"):
        import testbed.zoo

        testbed.zoo.open(bad)


# -- two builders at once -------------------------------------------------------------------------
def test_two_concurrent_builders_train_each_entry_once(tmp_path):
    spec = tiny_spec(tmp_path, epochs=2)
    zoo = tmp_path / "zoo"
    procs = [builder(spec, zoo), builder(spec, zoo, "--workers", "2")]  # also exercises the process pool
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, (out, err)
    m = json.loads((zoo / "manifest.json").read_text())
    assert m["complete"] and len(m["entries"]) == 2
    for e in m["entries"]:
        starts = [r for r in zoo_log(zoo, e["id"]) if r["event"] == "start"]
        assert len(starts) == 1 and starts[0]["resume"] is False
        assert train_epochs(zoo, e["id"]) == [1, 2]
    assert len(list((zoo / "data").glob("*.h5"))) == 2
    assert main(["zoo", "verify", str(zoo)]) == 0


# -- Ray ------------------------------------------------------------------------------------------
def test_ray_backend_builds_a_zoo(tmp_path):
    ray = pytest.importorskip("ray")
    from testbed.zoo.build import build

    spec = tiny_spec(tmp_path, epochs=1, attacks='["n1"]')
    zoo = tmp_path / "zoo"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = build(spec, zoo, backend="ray", device="cpu", progress=False, say=lambda m: None)
    finally:
        ray.shutdown()
    assert result.ok and result.done == ["deeplabv3_tiny--n1--s0"]
    start = zoo_log(zoo, "deeplabv3_tiny--n1--s0")[0]
    assert start["pid"] != os.getpid()  # trained in a Ray worker process, not here
    assert train_epochs(zoo, "deeplabv3_tiny--n1--s0") == [1]
    assert main(["zoo", "verify", str(zoo)]) == 0


def test_ls_pairs_each_attacked_entry_with_the_benign_entry_of_its_training_setting(tmp_path, capsys):
    """Two training settings (grid epochs = [1, 2]): each attacked entry's benign reference is the benign entry of
    its own setting, by the rule `testbed bench` uses (one definition); pairing by model and seed alone took the
    same benign entry for both."""
    import testbed.zoo
    from testbed.zoo import benign_floors, listed_floors
    from testbed.zoo import manifest as mf

    spec = tmp_path / "zoo.toml"
    spec.write_text(TINY.format(epochs=1, attacks='["benign", "n1"]').replace("epochs = 1\n", "")
                    .replace("seed = [0]", "seed = [0]\nepochs = [1, 2]"))
    zoo = tmp_path / "zoo"
    assert main(["-q", "zoo", "build", str(spec), "--out", str(zoo), "--device", "cpu"]) == 0
    capsys.readouterr()
    benign = {e: f"deeplabv3_tiny--benign--s0--epochs-{e}" for e in (1, 2)}
    attacked = {e: f"deeplabv3_tiny--n1--s0--epochs-{e}" for e in (1, 2)}
    assert {r["id"] for r in mf.collect(zoo)["entries"]} == {*benign.values(), *attacked.values()}
    floors = benign_floors(list(testbed.zoo.open(zoo)))  # bench's pairing
    assert {k: v["entry"] for k, v in floors.items()} == {attacked[1]: benign[1], attacked[2]: benign[2]}
    assert listed_floors(mf.collect(zoo)["entries"]) == floors
    for e, asr in ((1, 11.0), (2, 22.0)):  # distinct benign scores (a hand edit, as in the NO GAIN test)
        done = json.loads((zoo / "entries" / benign[e] / "done.json").read_text())
        done["reference"]["n1"]["ASR"] = asr
        (zoo / "entries" / benign[e] / "done.json").write_text(json.dumps(done))
    assert main(["zoo", "ls", str(zoo), "--json", "--min-asr", "0"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert [(rows[attacked[e]]["benign_entry"], rows[attacked[e]]["benign_ASR"]) for e in (1, 2)] == [
        (benign[1], 11.0), (benign[2], 22.0)]
    assert rows[benign[1]]["benign_ASR"] is None and rows[benign[1]]["benign_entry"] is None


def test_ls_marks_attacks_that_did_not_implant_and_names_the_data(resumed_zoo, capsys):
    zoo, _, first, second, _, _ = resumed_zoo
    asr = json.loads((zoo / "entries" / second / "metrics.json").read_text())["ASR"]
    assert main(["zoo", "ls", str(zoo), "--json", "--min-asr", "100"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[first]["implanted"] == "benign" and rows[first]["data"] == "data/clean.h5"
    want = "implanted" if asr >= 100 else f"FAILED (ASR {asr:.1f}% < 100%)"
    assert rows[second]["implanted"] == want and rows[second]["data"].startswith("data/poisoned-")
    assert main(["zoo", "ls", str(zoo), "--min-asr", "0"]) == 0
    assert "implanted" in capsys.readouterr().out
    assert main(["zoo", "ls", str(zoo), "--min-asr", "101"]) == 2


def test_an_attack_added_to_a_built_zoo_gets_its_benign_reference_scores(tmp_path, monkeypatch, capsys):
    """The benign entry is scored on every attack of its grid, also on one added after it was built."""
    import testbed.zoo
    from testbed.training.runs import load_run
    from testbed.scoring.scorer import score_model
    from testbed.zoo import build as zb

    spec = tiny_spec(tmp_path, epochs=1)
    zoo = tmp_path / "zoo"
    assert zb.build(spec, zoo, device="cpu", progress=False, say=lambda m: None).ok
    benign = "deeplabv3_tiny--benign--s0"
    text = spec.read_text().replace("[grid]", '[[attack]]\nid = "n1-half"\nattack = "fgba"\npreset = "n-to-1"\n'
                                    'target = "wall"\ntrigger = "line"\nrate = 0.5\n[grid]')
    spec.write_text(text.replace('attack = ["benign", "n1"]', 'attack = ["benign", "n1", "n1-half"]'))
    # what builds before this fix did: the plan lists the new attack, the finished benign entry is not rescored
    monkeypatch.setattr(zb, "refresh_references", lambda *a, **k: [])
    assert zb.build(spec, zoo, device="cpu", progress=False, say=lambda m: None).ok
    capsys.readouterr()
    assert main(["zoo", "verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert f"entry {benign}: stale: no benign reference scores for n1-half" in out
    monkeypatch.undo()

    before = {p.name: p.read_bytes() for p in (zoo / "entries" / benign).iterdir() if p.name in ("model.safetensors", "metrics.json")}
    said: list[str] = []
    assert zb.build(spec, zoo, device="cpu", progress=False, say=said.append).ok
    assert any("benign reference scores added for n1-half" in s for s in said)
    assert main(["zoo", "verify", str(zoo)]) == 0
    entries = {e.id: e for e in testbed.zoo.open(zoo)}
    ref = entries[benign].metrics["reference"]
    assert sorted(ref) == ["n1", "n1-half"]
    model, _ = load_run(zoo / "entries" / benign, "cpu")
    expected = score_model(model, entries["deeplabv3_tiny--n1-half--s0"].data_path, "cpu")
    assert ref["n1-half"]["ASR"] == pytest.approx(expected["ASR"]) and ref["n1-half"]["mIoU-B"] == pytest.approx(expected["mIoU-B"])
    full = json.loads((zoo / "entries" / benign / "reference.json").read_text())
    assert sorted(full) == ["n1", "n1-half"]
    # the model itself was not retrained
    assert {n: (zoo / "entries" / benign / n).read_bytes() for n in before} == before
    assert [r["event"] for r in zoo_log(zoo, benign)] == ["start", "finish"]  # only reference.json and done.json change
    assert [r["scored"] for r in json.loads((zoo / "entries" / benign / "done.json").read_text())["rescored"]] == [["n1-half"]]


def test_a_spec_with_another_part_of_the_grid_keeps_the_benign_scores_of_the_first(tmp_path):
    """Two specs of one zoo, each with the benign entry and other attacks (the CamVid benchmark's parts): building
    the second adds its attack's reference scores to the benign entry and keeps those of the first — the attacked
    entries of the first part keep their benign floor (in a bench's pair keys and `zoo ls`)."""
    import testbed.zoo
    from testbed.zoo import build as zb

    first = tiny_spec(tmp_path, epochs=1)
    zoo = tmp_path / "zoo"
    assert zb.build(first, zoo, device="cpu", progress=False, say=lambda m: None).ok
    floor = testbed.zoo.benign_floors(list(testbed.zoo.open(zoo)))["deeplabv3_tiny--n1--s0"]
    second = tmp_path / "second.toml"
    second.write_text(first.read_text().replace("[grid]", '[[attack]]\nid = "n1-half"\nattack = "fgba"\n'
                                                 'preset = "n-to-1"\ntarget = "wall"\ntrigger = "line"\nrate = 0.5\n[grid]')
                      .replace('attack = ["benign", "n1"]', 'attack = ["benign", "n1-half"]'))
    said: list[str] = []
    assert zb.build(second, zoo, device="cpu", progress=False, say=said.append).ok
    assert any("benign reference scores added for n1-half" in m for m in said)
    entries = list(testbed.zoo.open(zoo))
    benign = {e.id: e for e in entries}["deeplabv3_tiny--benign--s0"]
    assert sorted(benign.metrics["reference"]) == ["n1", "n1-half"]
    floors = testbed.zoo.benign_floors(entries)
    assert floors["deeplabv3_tiny--n1--s0"] == floor and "deeplabv3_tiny--n1-half--s0" in floors
    assert main(["zoo", "verify", str(zoo)]) == 0


def test_a_rescore_never_seals_a_file_changed_while_it_scored(tmp_path, monkeypatch):
    """Tampering during the rescore (here: metrics.json edited while the model scores) is refused, not sealed."""
    from testbed.zoo import build as zb
    from testbed.zoo import entries

    spec = tiny_spec(tmp_path, epochs=1)
    zoo = tmp_path / "zoo"
    assert zb.build(spec, zoo, device="cpu", progress=False, say=lambda m: None).ok
    spec.write_text(spec.read_text().replace("[grid]", '[[attack]]\nid = "n1-half"\nattack = "fgba"\npreset = "n-to-1"\n'
                                             'target = "wall"\ntrigger = "line"\nrate = 0.5\n[grid]')
                    .replace('attack = ["benign", "n1"]', 'attack = ["benign", "n1", "n1-half"]'))
    benign = "deeplabv3_tiny--benign--s0"
    metrics = zoo / "entries" / benign / "metrics.json"
    real = entries._score_references

    def score_and_tamper(*args, **kwargs):
        out = real(*args, **kwargs)
        metrics.write_text(metrics.read_text().replace('"mIoU-B": ', '"mIoU-B": 9'))  # a flattering edit mid-rescore
        return out

    monkeypatch.setattr(entries, "_score_references", score_and_tamper)
    from testbed.core.errors import UserError

    with pytest.raises(UserError, match=f"entry {benign}: .*metrics.json.*not rescoring"):
        zb.build(spec, zoo, device="cpu", progress=False, say=lambda m: None)
    assert "n1-half" not in json.loads((zoo / "entries" / benign / "done.json").read_text())["reference"]
    assert main(["zoo", "verify", str(zoo)]) == 1  # the edit is reported, not blessed


def test_executors_run_the_task_they_are_given(tmp_path):
    """execution/ knows no zoo: the caller's task runs, inline and in the process pool, with the job's id."""
    from testbed.execution.executors import InlineExecutor, ProcessExecutor, schedule
    from testbed.zoo.entries import run_entry_safe

    seen = []

    def task(target, job_id, device, threads, progress, stale_after):
        seen.append((target, job_id, device, threads, progress, stale_after))
        return {"status": "done", "value": job_id.upper()}

    got = {}
    schedule(["a", "b"], InlineExecutor(tmp_path, "cpu", 2, False, 9.0, task), got.__setitem__)
    assert seen == [(str(tmp_path), "a", "cpu", 2, False, 9.0), (str(tmp_path), "b", "cpu", 2, False, 9.0)]
    assert {k: v["value"] for k, v in got.items()} == {"a": "A", "b": "B"}
    pool, got = ProcessExecutor(tmp_path, 1, "cpu", 9.0, True, 1, task=run_entry_safe), {}
    try:  # a spawned worker runs the zoo's task: here on a folder that is no zoo, a failed result per id
        schedule(["x"], pool, got.__setitem__)
    finally:
        pool.close()
    assert got["x"]["status"] == "failed" and "not a model zoo" in got["x"]["error"]
