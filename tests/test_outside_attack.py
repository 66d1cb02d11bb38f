"""An attack written from docs/writing-an-attack.md runs through `testbed poison`, a zoo spec and `testbed bench`
with no edit to the project (examples/outside_attack: CornerPatch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.cli import main
from testbed.data.h5data import open_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "outside_attack"
SPEC = """
[data]
synth = {{ n_train = 40, n_test = 12, size = 32, seed = 0 }}
[train]
epochs = 1
batch_size = 8
[[attack]]
id = "benign"
[[attack]]
id = "corner"
attack = "{attack}"
source = "person"
target = "palm"
size = 6
rate = 0.2
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign", "corner"]
seed = [0]
"""


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory) -> Path:
    from testbed.data.synth import make_synth_dataset

    return make_synth_dataset(tmp_path_factory.mktemp("outside") / "clean.h5", n_train=40, n_test=12, size=32, seed=0)


@pytest.fixture
def outside(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("corner_patch_attack", None)
    yield
    sys.modules.pop("corner_patch_attack", None)


def _check_poisoned(clean: Path, poisoned: Path, size: int) -> None:
    with open_dataset(clean) as c, open_dataset(poisoned) as p:
        person, palm = c.classes.index("person"), c.classes.index("palm")
        idx = p["train/poison_index"]
        assert len(idx) == 8 and p.attack["name"] == "corner-patch" and p.attack["params"]["size"] == size
        for i in idx:
            x0, y0 = c["train/images"][i], c["train/labels"][i]
            x1, y1 = p["train/images"][i], p["train/labels"][i]
            assert (y0 == person).any()  # only samples the attack changes are drawn
            assert (x1[:size, :size] == 255).all() and np.array_equal(x1[size:], x0[size:])
            want = np.where(y0 == person, palm, y0)
            assert np.array_equal(y1, want)


def test_outside_attack_by_module_and_entry_point(outside, synth_small, tmp_path, capsys):
    out = tmp_path / "corner.h5"
    rc = main(["-q", "poison", str(synth_small), "--attack", "corner_patch_attack:CornerPatch", "--source", "person",
               "--target", "palm", "--param", "size=6", "--rate", "0.2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    _check_poisoned(synth_small, out, 6)
    # a bad parameter of the outside attack is spelled as the flag the user typed
    rc = main(["-q", "poison", str(synth_small), "--attack", "corner_patch_attack:CornerPatch", "--source", "person",
               "--target", "person", "--out", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["testbed: error: --source and --target must differ"]
    assert not (tmp_path / "x.h5").exists()
    # installed as a plugin: found by its entry-point name
    dist = tmp_path / "corner_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: corner-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[testbed.attacks]\ncorner-test = corner_patch_attack:CornerPatch\n")
    sys.path.insert(0, str(tmp_path))
    try:
        out2 = tmp_path / "corner2.h5"
        rc = main(["-q", "poison", str(synth_small), "--attack", "corner-test", "--source", "person", "--target", "palm",
                   "--param", "size=6", "--rate", "0.2", "--out", str(out2)])
        assert rc == 0
        _check_poisoned(synth_small, out2, 6)
    finally:
        sys.path.remove(str(tmp_path))


def test_outside_attack_through_a_zoo_and_bench(outside, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(attack="corner_patch_attack:CornerPatch"))
    zoo, report = tmp_path / "zoo", tmp_path / "bench"
    assert main(["-q", "zoo", "build", str(spec), "--out", str(zoo)]) == 0, capsys.readouterr().err
    rc = main(["-q", "bench", "--zoo", str(zoo), "--defense", "strip", "--param", "strip.n_overlays=2",
               "--no-figures", "--out", str(report)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((report / "results.json").read_text())["rows"]
    attacked = [r for r in rows if "corner" in r["model"]]
    assert len(attacked) == 1 and attacked[0]["attack"] == "corner"  # zoo rows carry the spec's attack id
    assert attacked[0]["attack_params"] == {"source": "person", "target": "palm", "size": 6}
    assert attacked[0]["before"]["ASR"] is not None and attacked[0]["error"] is None
    # and a bad value in the spec is refused before anything is built, in the spec's own vocabulary
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.format(attack="corner_patch_attack:CornerPatch").replace("size = 6", "size = 0"))
    rc = main(["-q", "zoo", "build", str(bad), "--out", str(tmp_path / "zoo2")])
    err = capsys.readouterr().err
    assert rc == 2 and "size must be a positive number of pixels" in err and not (tmp_path / "zoo2").exists()
