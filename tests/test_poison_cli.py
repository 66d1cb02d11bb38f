"""`testbed poison` (docs/attacks.md): the summary, the record, and every bad input → exit 2, one stderr line, no file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from testbed.cli import main
from testbed.data.h5data import content_hash, open_dataset
try:
    from tests.test_attacks import make_clean
except ImportError:  # pytest run without the repo root on sys.path
    from test_attacks import make_clean


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_clean(tmp_path_factory.mktemp("cli") / "clean.h5")


@pytest.fixture(scope="module")
def poisoned(clean) -> Path:
    out = clean.with_name("poisoned.h5")
    assert main(["-q", "poison", str(clean), "--attack", "fgba", "--preset", "n-to-1", "--target", "wall",
                 "--trigger", "line", "--out", str(out)]) == 0
    return out


def test_summary_matches_the_file(clean, tmp_path, capsys):
    out = tmp_path / "p.h5"
    rc = main(["poison", str(clean), "--attack", "fgba", "--preset", "1-to-1", "--source", "person", "--target", "palm",
               "--trigger", "line", "--rate", "0.25", "--seed", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    with open_dataset(out) as f:
        n_p, n_a, n_b = len(f["train/poison_index"]), len(f["test_attacked/index"]), len(f["test_benign/index"])
        assert f.attack["seed"] == 2 and f.attack["params"]["source"] == "person"
    assert n_p == 10  # 25% of 40; 16 samples hold a person
    assert f"poisoned {n_p} of 40" in text and "rate 0.2500" in text
    assert f"{n_a} attacked, {n_b} benign" in text


def test_json_and_line_options(clean, tmp_path, capsys):
    out = tmp_path / "p.h5"
    rc = main(["poison", str(clean), "--attack", "badnets", "--trigger", "line", "--alpha", "0.5", "--line-width", "3",
               "--line-position", "bottom", "--target-image", "2", "--clean-fraction", "0.1", "--json", "--out", str(out)])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["target_image"] == 2 and rec["clean_size"] == 4
    assert rec["trigger"]["alpha"] == 0.5 and rec["trigger"]["width"] == 3 and rec["trigger"]["span"] == [13, 16]
    with open_dataset(clean) as c, open_dataset(out) as p:
        i = int(p["train/poison_index"][0])
        x, g = c["train/images"][i].astype(np.float64), p["train/images"][i]
        np.testing.assert_array_equal(g[:13], x[:13])
        np.testing.assert_array_equal(g[13:], np.floor(0.5 * x[13:] + 0.5))  # blended with black


def test_semantic_rate_is_ignored_with_a_note(clean, tmp_path, capsys):
    out = tmp_path / "p.h5"
    rc = main(["poison", str(clean), "--attack", "badnets", "--trigger", "semantic:grass", "--rate", "0.3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "note: --rate 0.3 ignored" in err
    with open_dataset(out) as f:
        assert f.attack["requested_rate"] is None and f.attack["achieved_rate"] == 8 / 40


def test_cli_is_deterministic(clean, poisoned, tmp_path):
    out = tmp_path / "again.h5"
    assert main(["-q", "poison", str(clean), "--attack", "fgba", "--preset", "n-to-1", "--target", "wall",
                 "--trigger", "line", "--seed", "0", "--out", str(out)]) == 0
    assert content_hash(out) == content_hash(poisoned)


BAD = {
    "unknown target class": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wal", "--trigger", "line"], "did you mean 'wall'"),
    "unknown source class": (["--attack", "fgba", "--preset", "1-to-1", "--source", "persn", "--target", "palm", "--trigger", "line"], "unknown class 'persn'"),
    "unknown map class": (["--attack", "fgba", "--map", "person:plam", "--trigger", "line"], "unknown class 'plam'"),
    "unknown trigger class": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "semantic:gras"], "unknown class 'gras'"),
    "source equals target": (["--attack", "fgba", "--preset", "1-to-1", "--source", "person", "--target", "person", "--trigger", "line"], "differ"),
    "map to itself": (["--attack", "fgba", "--map", "car:car", "--trigger", "line"], "differ"),
    "rate zero": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "line", "--rate", "0"], "(0, 1]"),
    "rate above one": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "line", "--rate", "1.5"], "(0, 1]"),
    "too few candidates": (["--attack", "fgba", "--preset", "1-to-1", "--source", "person", "--target", "palm", "--trigger", "line", "--rate", "0.5"], "20 poisoned samples but only 16"),
    "trigger class absent": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "semantic:ceiling"], "absent"),
    "unknown trigger": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "star"], "unknown trigger"),
    "alpha out of range": (["--attack", "fgba", "--preset", "n-to-1", "--target", "wall", "--trigger", "line", "--alpha", "2"], "--alpha"),
    "badnets with fgba flags": (["--attack", "badnets", "--preset", "n-to-1", "--trigger", "line"], "belong to --attack fgba"),
    "fgba without a preset": (["--attack", "fgba", "--trigger", "line"], "--preset"),
    "target image out of range": (["--attack", "badnets", "--trigger", "line", "--target-image", "99"], "out of range"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_no_file(case, clean, tmp_path, capsys):
    argv, needle = BAD[case]
    out = tmp_path / "out.h5"
    rc = main(["poison", str(clean), *argv, "--out", str(out)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, case
    assert len(lines) == 1 and lines[0].startswith("testbed: error: ") and needle in lines[0], cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_already_poisoned_without_force(poisoned, tmp_path, capsys):
    out = tmp_path / "out.h5"
    rc = main(["poison", str(poisoned), "--attack", "badnets", "--trigger", "line", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == f"testbed: error: {poisoned} is already poisoned (attack fgba-n-to-1, trigger line); pass --force to poison it again"
    assert not out.exists()
    assert main(["-q", "poison", str(poisoned), "--attack", "badnets", "--trigger", "line", "--force", "--out", str(out)]) == 0
    with open_dataset(out) as f:
        assert f.attack["parent_attack"]["label"] == "fgba-n-to-1"


def test_missing_input_and_out_dir(tmp_path, capsys, clean):
    rc = main(["poison", str(tmp_path / "nope.h5"), "--attack", "badnets", "--trigger", "line", "--out", str(tmp_path / "o.h5")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main(["poison", str(clean), "--attack", "badnets", "--trigger", "line", "--out", str(tmp_path / "nodir" / "o.h5")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["poison", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text and "semantic:wall" in text and "--target-image" in text


def test_unknown_trigger_error_names_every_trigger_form():
    """The error lists each registered trigger as it is written, the blended trigger's optional alpha included."""
    from testbed.attacks.triggers import TRIGGERS, parse_trigger
    from testbed.core.errors import ParamError

    with pytest.raises(ParamError) as e:
        parse_trigger("bogus")
    text = str(e.value)
    assert "blended[:" in text and "semantic:CLASS" in text
    assert all(name in text for name in TRIGGERS)
