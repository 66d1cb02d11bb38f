"""docs/camvid.md's learning-curve table is what docs/make_camvid_curves.py prints from the committed runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_curve_tables_match_the_committed_runs():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "make_camvid_curves.py")],
                         capture_output=True, text=True, check=True).stdout
    tables = [t.strip() for t in out.split(":\n\n")[1:]]
    page = (ROOT / "docs" / "camvid.md").read_text()
    assert len(tables) >= 2, out  # the 150- and the 80-epoch curve runs
    for table in tables:
        table = table.split("\n\n")[0]
        assert table.count("\n") >= 3, out  # header, rule and at least two entries
        assert table in page


def test_plateau_rule_is_read_from_the_curve(tmp_path):
    """A curve whose best is early and whose last 20% sit 3 points lower fails the rule (computed by hand)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_camvid_curves as m
    finally:
        sys.path.pop(0)
    e = tmp_path / "z" / "m--benign--s0"
    e.mkdir(parents=True)
    rows = [(5, 40.0), (10, 50.0), (15, 47.0), (20, 46.5)]  # epochs 17-20 are the last 20%: best there 46.5
    (e / "curve.csv").write_text("epoch,val_mIoU\n" + "".join(f"{a},{b}\n" for a, b in rows))
    (e / "config.json").write_text('{"train": {"epochs": 20}, "training_seconds": 12.0}')
    (e / "metrics.json").write_text('{"mIoU-B": 30.0, "PA-B": 70.0}')
    row = m.entry_row(e, e)
    assert "| 50.0 (10) | 46.5 | fails (3.5 below) |" in row


def test_the_camvid_parts_are_the_reference_zoo_split():
    """examples/zoo-camvid-part-{a,b,c}.toml: the reference spec's data, training and attack tables unchanged, each
    with the benign models, and together every setting of its grid (so their entries are the reference zoo's)."""
    import tomllib

    full = tomllib.loads((ROOT / "examples" / "zoo-camvid.toml").read_text())
    seen = set()
    for k in "abc":
        part = tomllib.loads((ROOT / "examples" / f"zoo-camvid-part-{k}.toml").read_text())
        assert {x: part[x] for x in ("data", "train", "attack")} == {x: full[x] for x in ("data", "train", "attack")}
        assert part["grid"]["model"] == full["grid"]["model"] and part["grid"]["seed"] == full["grid"]["seed"]
        assert "benign" in part["grid"]["attack"] and set(part["grid"]) == set(full["grid"])
        seen |= set(part["grid"]["attack"])
    assert seen == set(full["grid"]["attack"])
