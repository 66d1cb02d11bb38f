"""docs/results.md is what docs/make_results.py makes from the report files committed under docs/results/."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DOCS = str(ROOT / "docs")
sys.path.insert(0, DOCS)
import make_nc_rule  # noqa: E402
import make_results  # noqa: E402  (a script beside the page, not a package)

while DOCS in sys.path:  # make_results puts docs/ on the path too
    sys.path.remove(DOCS)


def test_the_page_and_its_csvs_equal_their_regeneration(capsys):
    assert make_results.main(["--check"]) == 0, capsys.readouterr().out
    page = (ROOT / "docs" / "results.md").read_text()
    assert page.index("## Real data: CamVid") < page.index("## Synthetic scenes")  # real data leads


def _entry(zoo: Path, eid: str, seed: int, metrics: dict, attack: dict | None, reference: dict | None = None) -> dict:
    d = zoo / "entries" / eid
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    config = {"model": "m", "train": {"epochs": 10, "batch_size": 8}, "threads": 1, "training_seconds": 1.0,
              "dataset": {"content_hash": "x", "num_train": 5, "attack": attack and {"achieved_rate": 0.1, "poisoned": 1}},
              "precision": {"used": "fp32", "cpu": {"model": "cpu"}}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "curve.csv").write_text("epoch,val_mIoU\n5,40.0\n10,41.5\n")
    if reference:
        (d / "reference.json").write_text(json.dumps(reference))
    return {"id": eid, "attack_id": eid.split("--")[1], "attack": attack, "config": {"seed": seed}}


def test_zoo_table_cells_are_computed_from_the_entries(tmp_path, monkeypatch):
    """Two seeds of a benign and a BadNets model: the ASR cell, the paired mIoU-B drop and the implanted count,
    checked against numbers computed here with scipy (mean ± t_{0.975, n-1} · s / √n)."""
    zoo = tmp_path / "results" / "camvid" / "zoo"
    asr, miou, base, floor = [95.0, 85.0], [40.0, 37.0], [41.0, 39.0], [10.0, 12.0]
    entries = []
    for s in (0, 1):
        entries.append(_entry(zoo, f"m--benign--s{s}", s, {"mIoU-B": base[s], "PA-B": 80.0}, None,
                              {"bd": {"ASR": floor[s]}}))
        entries.append(_entry(zoo, f"m--bd--s{s}", s, {"mIoU-B": miou[s], "PA-B": 79.0, "ASR": asr[s]},
                              {"attack": "badnets"}))
    (zoo / "manifest.json").write_text(json.dumps({"entries": entries, "counts": {"entries": 4}, "datasets": {}}))
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")

    def cell(values):
        x = np.array(values)
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        return f"{x.mean():.1f} ± {half:.1f} [{len(x)}]"

    entries, planned = make_results.load_zoo(zoo)
    assert planned == 4
    rows = make_results.per_seed_rows(entries)
    line = next(ln for ln in make_results.zoo_table(rows).splitlines() if ln.startswith("| bd |"))
    drop = [m - b for m, b in zip(miou, base)]
    assert f"| {cell(asr)} | {cell(floor)} | {cell(miou)} | {cell(drop)} |" in line
    assert "| 1/2 (≥ 90%) |" in line  # 95 ≥ 90 implants, 85 does not (BadNets bar)
    assert "| 2/2 |" in line  # both curves: best 41.5 is in the last 20% of 10 epochs
    written = list(csv.DictReader(make_results.per_seed_csv(rows).splitlines()))
    assert [r["implanted"] for r in written if r["setting"] == "bd"] == ["True", "False"]
    assert float(written[1]["mIoU-B_minus_benign"]) == drop[0]


def test_a_setting_not_implanted_on_every_seed_is_named_with_its_curves(tmp_path, monkeypatch, capsys):
    """The acceptance's "the page says so with its curve": the setting, its implanted count and per-seed ASR, and a
    figure drawn from the committed curve.csv files; --check reports a missing figure (its bytes follow
    matplotlib's version, so only its presence is checked)."""
    results = tmp_path / "results"
    zoo = results / "camvid" / "zoo"
    entries = [_entry(zoo, f"m--benign--s{s}", s, {"mIoU-B": 40.0, "PA-B": 80.0}, None, {"bd": {"ASR": 10.0}})
               for s in (0, 1)]
    entries += [_entry(zoo, f"m--bd--s{s}", s, {"mIoU-B": 39.0, "PA-B": 79.0, "ASR": a}, {"attack": "badnets"})
                for s, a in ((0, 95.0), (1, 85.0))]
    (zoo / "manifest.json").write_text(json.dumps({"entries": entries, "counts": {"entries": 4}, "datasets": {}}))
    monkeypatch.setattr(make_results, "RESULTS", results)
    monkeypatch.setattr(make_results, "DOCS", tmp_path)
    (tmp_path / "results.md").write_text("")
    body, _, figures = make_results.render()
    assert "- `bd`: implanted on 1 of 2 seeds (ASR seed 0 95.0, seed 1 85.0; bar 90%)." in body
    assert "](results/camvid/curves/bd.png)" in body and list(figures) == [results / "camvid" / "curves" / "bd.png"]
    assert make_results.main([]) == 0
    png = (results / "camvid" / "curves" / "bd.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert make_results.main(["--check"]) == 0
    (results / "camvid" / "curves" / "bd.png").unlink()
    capsys.readouterr()
    assert make_results.main(["--check"]) == 1 and "results/camvid/curves/bd.png" in capsys.readouterr().out
    # a figure whose setting is no longer shown (it now implants on every seed) is reported, then removed
    (results / "camvid" / "curves" / "old.png").write_bytes(b"x")
    assert make_results.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "not shown any more: " in out and out.strip().endswith("results/camvid/curves/old.png")
    assert make_results.main([]) == 0 and not (results / "camvid" / "curves" / "old.png").exists()
    assert (results / "camvid" / "curves" / "bd.png").is_file() and make_results.main(["--check"]) == 0


def test_zoo_cost_sums_the_runs_and_names_those_without_cpu_seconds():
    """Wall seconds of every model, CPU seconds of those whose runs recorded them (a resumed zoo may mix both)."""
    def entry(wall, cpu):
        return {"config": {"training_seconds": wall, **({} if cpu is None else {"training_cpu_seconds": cpu})}}

    text = make_results.zoo_cost([entry(1800.0, 1500.0), entry(3600.0, None), entry(1800.0, 2100.0)])
    assert text.startswith("Training (scoring not included): 2.00 h of epochs' wall time over the 3 models")
    assert "CPU time 1.00 CPU-h over the 2 models that recorded it (30.0 CPU-min per model)" in text
    assert "1 model(s) trained before runs recorded CPU time" in text


def test_a_missing_report_is_a_section_that_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    body, csvs, figures = make_results.render()
    n = len(make_results.DATASETS)
    assert body.count("Not run yet") == 2 * n and csvs == {} and figures == {}  # every dataset × (zoo, bench)


def test_a_missing_source_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    assert make_results.main(["--collect-zoo", "camvid", str(tmp_path / "no-such-zoo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-zoo" in err[0]
    assert not (tmp_path / "results").exists()  # nothing written
    assert make_results.main(["--check", "--collect-zoo", "camvid", str(tmp_path)]) == 2


def test_a_bench_on_part_of_a_zoo_says_which_models_it_holds():
    zoo = [f"m--{a}--s{s}" for a in ("benign", "bd", "warp") for s in (0, 1, 2)]
    benched = {f"m--{a}--s{s}" for a in ("benign", "bd") for s in (0, 1, 2)} | {"m--warp--s0"}
    text = make_results.coverage_text(benched, zoo)
    assert text == ("Models benchmarked: 7 of the zoo's 9, by setting (models): benign (3), bd (3), warp (1). "
                    "Not benchmarked yet: warp (2).")
    assert make_results.coverage_text(set(zoo), zoo) == "" and make_results.coverage_text(benched, []) == ""


def test_the_earlier_nc_rule_puts_unconverged_norms_back_into_the_mad():
    """docs/make_nc_rule.py's counterfactual on a hand-made row. Converged norms 100, 1000, 1100, 1200: median 1050,
    MAD 100, so 100 sits 950 / (1.4826 x 100) = 6.4 scaled MADs below (flagged: the current rule). With the two
    unconverged last norms 4000, 4000 back in: median 1150, MAD 600, index 1050 / 889.6 = 1.18 (clean)."""
    row = {"defense": "trigger-synthesis", "settings": {"params": {}},
           "verdict": {"backdoored": True, "score": 6.4, "status": "backdoored", "suspected": [["*", "a"]]},
           "details": {"norms": {"*->a": 100.0, "*->b": 1000.0, "*->c": 1100.0, "*->d": 1200.0},
                       "unconverged": {"*->e": {"last_norm": 4000.0}, "*->f": {"last_norm": 4000.0}},
                       "coverage": 1.0}}
    earlier = make_nc_rule.every_candidate(row)["verdict"]
    assert earlier["status"] == "clean" and earlier["suspected"] == [] and not earlier["backdoored"]
    assert abs(earlier["score"] - 1050 / (1.4826 * 600)) < 1e-9
    row["details"]["unconverged"] = {}  # the same rule on the converged four alone flags a: index 6.4
    alone = make_nc_rule.every_candidate(row)["verdict"]
    assert alone["status"] == "backdoored" and alone["suspected"] == [["*", "a"]]
    assert abs(alone["score"] - 950 / (1.4826 * 100)) < 1e-9
