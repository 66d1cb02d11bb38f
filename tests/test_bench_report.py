"""`testbed bench` as a researcher's loop: merged and resumable reports, guards against meaningless numbers,
statistics in the report, parallel pairs, saved models, the defense's own figures, readable failures.

Every test runs on one tiny zoo (2 settings × 2 seeds, 32×32 images, one epoch) built once for the module.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from test_bench_cli import ZOO_SPEC as BASE_SPEC
from test_bench_cli import Brightness, DarkFilter  # noqa: F401 - run by name from this module
from test_defense_runner import reads  # noqa: F401 - the fixture counting file reads
from testbed.cli import main
from testbed.defense import DefenseResult, Verdict

ME = __name__
SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")
STATE: dict = {"noop": 0, "interrupt": None, "late": 0}

# the tiny zoo of test_bench_cli, with two seeds and 32×32 images
ZOO_SPEC = BASE_SPEC.replace("size = 64", "size = 32").replace("seed = [0]", "seed = [0, 1]")
assert "seed = [0, 1]" in ZOO_SPEC and "size = 32" in ZOO_SPEC


class NoOp:
    """A repair that changes nothing (counts its runs, for the resume test)."""

    name = "no-op"

    def run(self, model, ctx):
        STATE["noop"] += 1
        return DefenseResult(model=model)


class Late:
    """Counts its runs; raises KeyboardInterrupt (a killed bench) on the run STATE["interrupt"] names."""

    name = "late"

    def run(self, model, ctx):
        STATE["late"] += 1
        if STATE["interrupt"] == STATE["late"]:
            raise KeyboardInterrupt
        return DefenseResult(verdict=Verdict(backdoored=False, score=0.0))


class Shrink:
    """A repair that scales the classifier: a real change of the model, of the same architecture."""

    name = "shrink"

    def run(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.mul_(0.5)
        return DefenseResult(model=model)


class Scale:
    """A repair with a parameter: scales the classifier by ``factor``."""

    name = "scale"

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def run(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.mul_(self.factor)
        return DefenseResult(model=model)


class Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class Wrapper:
    name = "wrapper"

    def run(self, model, ctx):
        return DefenseResult(model=Wrapped(model))


class FlagFour:
    """Flags training samples 0-3 (the runner retrains without them, and without 4 random ones as a control)."""

    name = "flag-four"
    uses_training_set = True

    def run(self, model, ctx):
        return DefenseResult(flagged_train=np.arange(4))


class Crasher:
    name = "crasher"

    def run(self, model, ctx):
        return self.deep_inside()

    def deep_inside(self):
        raise RuntimeError("deliberate failure")


class Searcher:
    """A verdict cut short by its pass budget: inconclusive, with its coverage and the budget that stopped it."""

    name = "searcher"

    def run(self, model, ctx):
        STATE["budget_passes"] = ctx.budget_passes
        return DefenseResult(verdict=Verdict(backdoored=False, score=0.1, status="inconclusive", coverage=0.25),
                             details={"stopped_by": "passes"})


class Pictures:
    """Returns its own figures: a matplotlib figure and an image file."""

    name = "pictures"
    png: Path | None = None

    def run(self, model, ctx):
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        return DefenseResult(verdict=Verdict(backdoored=False, score=0.0),
                             details={"figures": {"diagonal": fig, "from-file": str(Pictures.png)}})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bench-zoo")
    (tmp / "zoo.toml").write_text(ZOO_SPEC)
    assert main(["-q", "zoo", "build", str(tmp / "zoo.toml"), "--out", str(tmp / "zoo"), "--device", "cpu"]) == 0
    return tmp / "zoo"


@pytest.fixture(scope="module")
def entries(zoo):
    import testbed.zoo

    return {e.id: e for e in testbed.zoo.open(zoo)}


def bench(zoo: Path, out: Path, defenses: str, *extra: str) -> int:
    return main(["-q", "bench", "--zoo", str(zoo), "--defense", defenses, "--device", "cpu", "--no-figures",
                 "--out", str(out), *extra])


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- item 1: a second bench into the same report merges, never silently discards ---------------------
def test_a_second_bench_merges_into_the_report(zoo, tmp_path, capsys):
    out = tmp_path / "b"
    assert bench(zoo, out, f"{ME}:DarkFilter,{ME}:Brightness", "--param", f"{ME}:Brightness.limit=0.1") == 0
    first = {(r["model"], r["defense"]): r for r in results(out)["rows"]}
    assert len(first) == 8
    assert bench(zoo, out, f"{ME}:Brightness", "--param", "limit=0.99") == 0  # bare KEY=VALUE: the one defense
    doc = results(out)
    rows = {(r["model"], r["defense"]): r for r in doc["rows"]}
    assert set(rows) == set(first)  # the dark-filter rows were kept...
    for key, r in rows.items():
        if key[1] == "dark-filter":
            assert r == first[key]
        else:  # ...and the brightness rows replaced by the new run's
            assert r["verdict"]["backdoored"] is False and first[key]["verdict"]["backdoored"] is True
            assert r["settings"]["params"] == {"limit": 0.99}
    assert len(read_csv(out / "results.csv")) == 8
    report = (out / "report.md").read_text()
    assert "dark-filter" in report and "rows come from earlier benches" in report
    assert doc["meta"]["rows_from_earlier_runs"] == 4

    assert bench(zoo, out, f"{ME}:Brightness", "--overwrite") == 0  # --overwrite starts afresh
    assert {r["defense"] for r in results(out)["rows"]} == {"brightness"}


def test_an_older_report_is_refused_not_overwritten(zoo, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.json").write_text('{"format": "segbackdoor-bench", "rows": []}\n')
    before = (out / "results.json").read_bytes()
    assert bench(zoo, out, f"{ME}:Brightness") == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (out / "results.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["results.json"]


# -- issue 15: a killed bench resumes; workers give the same bytes -------------------------------------
def test_a_killed_bench_resumes_without_redoing_finished_pairs(zoo, tmp_path):
    from testbed.bench.run import run_bench

    out = tmp_path / "r"
    STATE.update(noop=0, late=0, interrupt=2)  # the second run of `late` is killed: 3 pairs finished before it
    with pytest.raises(KeyboardInterrupt):
        run_bench(out, f"{ME}:NoOp,{ME}:Late", zoo=zoo, device="cpu", figures=False, progress=False, log=lambda m: None)
    assert (STATE["noop"], STATE["late"]) == (2, 2) and not (out / "results.json").exists()
    STATE.update(interrupt=None)
    said = []
    doc = run_bench(out, f"{ME}:NoOp,{ME}:Late", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append)
    assert (STATE["noop"], STATE["late"]) == (4, 2 + 3)  # 2 more no-op pairs; the interrupted late pair and 2 more
    assert any("resuming: 3 of 8" in m for m in said)
    assert len(doc["rows"]) == 8 and not (out / "work").exists()
    # the same arguments once more: nothing to do, said in one line, the report untouched
    said, before = [], (out / "results.json").read_bytes()
    again = run_bench(out, f"{ME}:NoOp,{ME}:Late", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append)
    assert STATE["noop"] == 4 and STATE["late"] == 5 and again["nothing_to_do"] and len(again["rows"]) == 8
    assert said == [f"8 of 8 pairs already finished in {out}; nothing to do (--rerun runs them again)"]
    assert (out / "results.json").read_bytes() == before and not (out / "work").exists()
    # --rerun runs every pair again
    said.clear()
    run_bench(out, f"{ME}:NoOp,{ME}:Late", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append,
              rerun=True)
    assert STATE["noop"] == 8 and not any("already finished" in m for m in said)


def test_a_bench_with_other_parameters_names_what_it_replaces(zoo, tmp_path):
    from testbed.bench.run import run_bench

    out = tmp_path / "p"
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=lambda m: None,
              entries="*s0")
    said = []
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append,
              entries="*s0", params={f"{ME}:Brightness": {"limit": 0.99}})
    (line,) = [m for m in said if m.startswith("replacing")]
    n = len(results(out)["rows"])
    assert line.startswith(f"replacing {n} finished pair(s) run with other settings: brightness on ")
    assert "params {} → {'limit': 0.99}" in line


def test_workers_give_the_same_bytes_per_pair(zoo, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    defenses = f"{ME}:DarkFilter,{ME}:Shrink"
    assert bench(zoo, one, defenses, "--threads", "1", "--entries", "*s0") == 0
    assert bench(zoo, two, defenses, "--threads", "1", "--entries", "*s0", "--workers", "2") == 0
    files = sorted(p.name for p in (one / "pairs").iterdir() if not p.name.endswith(".time.json"))
    assert len(files) == 8 and files == sorted(p.name for p in (two / "pairs").iterdir() if not p.name.endswith(".time.json"))
    for name in files:
        assert (one / "pairs" / name).read_bytes() == (two / "pairs" / name).read_bytes(), name
    rows1, rows2 = results(one)["rows"], results(two)["rows"]
    assert [(r["model"], r["defense"], r["after"]) for r in rows1] == [(r["model"], r["defense"], r["after"]) for r in rows2]


# -- issue 11: statistics in the report ----------------------------------------------------------------
def test_every_aggregate_in_results_json_recomputes(zoo, tmp_path):
    """An independent recomputation of every aggregate from the per-seed rows of a real results.json (1e-9)."""
    from test_stats import recompute_aggregate

    out = tmp_path / "s"
    assert bench(zoo, out, f"{ME}:DarkFilter,{ME}:Shrink,{ME}:Brightness", "--min-asr", "0") == 0
    doc = results(out)
    assert {"rows", "aggregate", "comparisons", "detection", "verdicts", "meta"} <= set(doc)
    expected = recompute_aggregate(doc["rows"])
    assert len(doc["aggregate"]) == len(expected) == 6
    for entry in doc["aggregate"]:
        g = entry["group"]
        n_ok, n_err, per = expected[(g["model"], g["attack"], entry["defense"])]
        assert (entry["n"], entry["errors"], entry["seeds"]) == (n_ok, n_err, [0, 1])
        for name, (n, mean, std, lo, hi) in per.items():
            st = entry["stats"][name]
            assert st["n"] == n and st["mean"] == pytest.approx(mean, abs=1e-9), name
            if std == 0:  # both seeds agree: scipy's interval degenerates to NaN, the interval is the point
                lo = hi = mean
            for k, v in (("std", std), ("lo", lo), ("hi", hi)):
                assert (st[k] is None) if v is None else st[k] == pytest.approx(v, abs=1e-9), (name, k)
    # results-aggregate.csv holds the same numbers at full precision
    table = read_csv(out / "results-aggregate.csv")
    assert len(table) == 6
    for row, entry in zip(table, doc["aggregate"]):
        assert row["defense"] == entry["defense"] and int(row["n"]) == entry["n"]
        if entry["stats"]["mIoU-B_after"]["mean"] is not None:
            assert float(row["mIoU-B_after_mean"]) == entry["stats"]["mIoU-B_after"]["mean"]
    # comparisons: every defense with after-scores against none, and the pair of them
    pairs = {(c["a"], c["b"]) for c in doc["comparisons"]}
    assert {("dark-filter", "none"), ("shrink", "none"), ("dark-filter", "shrink")} <= pairs
    shrink = next(c for c in doc["comparisons"] if (c["a"], c["b"]) == ("shrink", "none"))
    diffs = [r["after"]["mIoU-B"] - r["before"]["mIoU-B"] for r in doc["rows"] if r["defense"] == "shrink"]
    assert shrink["metrics"]["mIoU-B_after"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-9)
    (det,) = doc["detection"]
    assert det["defense"] == "brightness" and det["benign"] == 2 and det["backdoored"] == 2
    report = (out / "report.md").read_text()
    for section in ("## Over seeds", "## Paired comparisons", "## Detection across models", " ± "):
        assert section in report, section


# -- issue 11 item 3: budgets in passes; inconclusive verdicts ----------------------------------------
@pytest.mark.parametrize("value", ["0", "-5"])
def test_budget_passes_must_be_positive(zoo, tmp_path, capsys, value):
    out = tmp_path / "x"
    assert bench(zoo, out, f"{ME}:Searcher", "--budget-passes", value) == 2
    err = capsys.readouterr().err
    assert "--budget-passes must be a positive whole number" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_check_budgets_takes_numpy_numbers_and_refuses_bools():
    """The library entry takes the numbers a script computes (numpy scalars) as the CLI's do; a bool is not a number."""
    from testbed.bench.run import check_budgets
    from testbed.core.errors import UserError

    check_budgets(np.float32(2.5), np.int64(1000))
    check_budgets(3, None)
    for s, p, flag in [(True, None, "--budget "), (None, True, "--budget-passes"), (None, np.float64(10.0), "--budget-passes"),
                       (np.float64("nan"), None, "--budget "), (None, np.int32(0), "--budget-passes")]:
        with pytest.raises(UserError, match=flag):
            check_budgets(s, p)


def test_budget_passes_reach_the_defense_and_inconclusive_is_counted_apart(zoo, tmp_path):
    out = tmp_path / "p"
    assert bench(zoo, out, f"{ME}:Searcher", "--budget-passes", "1234") == 0
    assert STATE["budget_passes"] == 1234
    doc = results(out)
    for r in doc["rows"]:
        assert r["verdict"]["status"] == "inconclusive" and r["verdict"]["coverage"] == 0.25
        assert r["cost"]["budget_passes"] == 1234 and r["cost"]["stopped_by"] == "passes"
    (det,) = doc["detection"]
    assert det["inconclusive"] == {"benign": 2, "backdoored": 2} and det["decided"] == 0
    report = (out / "report.md").read_text()
    assert "inconclusive (0.10, coverage 0.25)" in report and "stopped by the passes budget" in report
    assert "| searcher | 2 | 2 | 2 / 2 |" in report  # the detection table's inconclusive column


# -- issue 14 item 4: an attack that did not implant --------------------------------------------------
def test_der_is_na_when_the_attack_did_not_implant(zoo, tmp_path):
    high, low = tmp_path / "high", tmp_path / "low"
    assert bench(zoo, high, f"{ME}:Shrink", "--min-asr", "100") == 0  # no one-epoch model reaches it
    assert bench(zoo, low, f"{ME}:Shrink", "--min-asr", "0") == 0
    for r_high, r_low in zip(results(high)["rows"], results(low)["rows"]):
        if r_high["benign_model"]:
            assert "attack_implanted" not in r_high and r_high["DER"] is None  # clean data: nothing to judge
            continue
        asr = r_high["before"]["ASR"]
        assert r_high["attack_implanted"] is False and r_high["DER"] is None
        assert asr < 100 and f"ASR {asr:.1f}% before any defense < 100%" in r_high["notes"][0]
        # --min-asr 0 judges nothing by the ASR alone; the zoo's benign floor still does (issue 24 walkthrough):
        # an ASR not above what the benign model of the same seed scores on the same attacked set is no backdoor
        floor = r_low["benign_floor"]["ASR"]
        assert r_low["attack_implanted"] is (asr > floor) and (r_low["DER"] is not None) is (asr > floor)
    report = (high / "report.md").read_text()
    assert "n/a¹" in report and "did not implant" in report


def test_attack_status_for_zoo_ls():
    from testbed.evaluation.attack_check import attack_failure, attack_status, check_min_asr
    from testbed.core.errors import UserError

    assert attack_status(True, None) == "benign" and attack_status(False, None) == "-"
    assert attack_status(False, 97.3) == "implanted" and attack_status(False, 50.0) == "implanted"
    assert attack_status(False, 3.14) == "FAILED (ASR 3.1% < 50%)"
    assert attack_status(False, 60.0, min_asr=70) == "FAILED (ASR 60.0% < 70%)"
    assert attack_failure(0.0, True) is None and attack_failure(None, False) is None and attack_failure(80.0, False) is None
    assert "0.0%" in attack_failure(0.0, False)
    for bad in (-1, 101, "x", True):
        with pytest.raises(UserError, match="min_asr"):
            check_min_asr(bad)


# -- issue 14 item 3: data other than the model's ------------------------------------------------------
def test_scoring_on_another_file_notes_it_and_labels_the_models_attack(zoo, entries, tmp_path, capsys):
    entry = entries["deeplabv3_tiny--fgba-n1-line--s0"]
    clean = zoo / "data" / "clean.h5"
    out = tmp_path / "d"
    rc = main(["-q", "defend", str(entry.run_dir), "--data", str(clean), "--defense", f"{ME}:Brightness",
               "--device", "cpu", "--no-figures", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    (row,) = results(out)["rows"]
    assert row["attack"] == "fgba-n-to-1" and row["benign_model"] is False  # the model's attack, not "benign"
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(entry.data_path.resolve()) in notes[0] and str(clean) in notes[0]
    assert "attack fgba-n-to-1" in notes[0] and "attack benign" in notes[0]
    assert row["notes"] == [notes[0].removeprefix("note: ")]
    # on its own data: no note
    rc = main(["-q", "defend", str(entry.run_dir), "--data", str(entry.data_path), "--defense", f"{ME}:Brightness",
               "--device", "cpu", "--no-figures", "--out", str(tmp_path / "own")])
    assert rc == 0 and "note:" not in capsys.readouterr().err


# -- issue 14 item 7: a crashing defense is shown where it crashed --------------------------------------
def test_a_crash_prints_where_and_the_traceback_with_debug(zoo, tmp_path, capsys):
    rc = bench(zoo, tmp_path / "c", f"{ME}:Crasher", "--entries", "*benign--s0")
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "in deep_inside: raise RuntimeError(\"deliberate failure\")" in err and "--debug" in err
    report = (tmp_path / "c" / "report.md").read_text()
    assert "in deep_inside: raise RuntimeError" in report and "in run: return self.deep_inside()" in report
    rc = bench(zoo, tmp_path / "c2", f"{ME}:Crasher", "--entries", "*benign--s0", "--debug")
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback (most recent call last)" in err and 'raise RuntimeError("deliberate failure")' in err


# -- issue 14 item 9: saved models and the defense's own figures ---------------------------------------
def test_saved_models_are_runs_that_score_accepts(zoo, entries, tmp_path, capsys):
    from testbed.training.runs import load_run

    out = tmp_path / "m"
    assert bench(zoo, out, f"{ME}:Shrink,{ME}:Wrapper", "--entries", "*fgba*s0", "--save-model") == 0
    rows = {r["defense"]: r for r in results(out)["rows"]}
    saved = out / rows["shrink"]["saved_model"]
    model, config = load_run(saved, "cpu")
    assert config["defense"]["name"] == "shrink" and config["model"] == "deeplabv3_tiny"
    original, _ = load_run(entries["deeplabv3_tiny--fgba-n1-line--s0"].run_dir, "cpu")
    torch.testing.assert_close(model.classifier.weight, original.classifier.weight * 0.5)
    capsys.readouterr()
    assert main(["-q", "score", str(saved), "--data", rows["shrink"]["data"], "--device", "cpu", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    for k in ("ASR", "mIoU-B"):
        assert scored[k] == pytest.approx(rows["shrink"]["after"][k], abs=1e-9)
    assert "saved_model" not in rows["wrapper"] and any("not saved" in n for n in rows["wrapper"]["notes"])
    assert [p.name for p in (out / "models").iterdir()] == [saved.name]


def test_a_defense_returns_its_own_figures(zoo, tmp_path):
    from PIL import Image

    png = tmp_path / "mine.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(png)
    Pictures.png = png
    out = tmp_path / "f"
    assert main(["-q", "bench", "--zoo", str(zoo), "--entries", "*benign--s0", "--defense", f"{ME}:Pictures",
                 "--device", "cpu", "--out", str(out)]) == 0
    (row,) = results(out)["rows"]
    assert row["details"]["figures"] == ["diagonal.png", "from-file.png"]
    assert [Path(p).name for p in row["defense_figures"]] == [
        "defense--deeplabv3_tiny--benign--s0--pictures--diagonal.png", "defense--deeplabv3_tiny--benign--s0--pictures--from-file.png"]
    assert (out / row["defense_figures"][1]).read_bytes() == png.read_bytes()
    with Image.open(out / row["defense_figures"][0]) as im:
        assert im.format == "PNG" and im.size == (200, 200)
    report = (out / "report.md").read_text()
    assert all(f"]({p})" in report for p in row["defense_figures"])


# -- issue 12: training-set defenses against a random control; filters on content-picked test sets -------
def test_retrain_rows_have_the_fraction_and_a_random_control(zoo, entries, tmp_path):
    from testbed.training.runs import load_run
    from testbed.scoring.scorer import score_model
    from testbed.training.loop import TrainConfig, train

    out = tmp_path / "t"
    assert bench(zoo, out, f"{ME}:FlagFour", "--entries", "*fgba*s0", "--threads", "1") == 0
    (row,) = results(out)["rows"]
    entry = entries["deeplabv3_tiny--fgba-n1-line--s0"]
    assert row["flagged"]["count"] == 4 and row["flagged"]["fraction"] == 4 / 32
    # the control, recomputed: 4 indices drawn uniformly with the bench seed on their own stream, retrained without
    removed = np.sort(np.random.default_rng([0, 0x52414E44]).choice(32, size=4, replace=False))
    assert not np.array_equal(removed, np.arange(4))
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.from_dict(dict(entry.config["train"]))
        cfg.device, cfg.amp, cfg.channels_last = "cpu", False, False
        run = train(entry.data_path, tmp_path / "control", cfg, train_indices=np.setdiff1d(np.arange(32), removed),
                    progress=False, score=False)
        expected = score_model(load_run(run, "cpu")[0], entry.data_path, device="cpu")
    finally:
        torch.set_num_threads(2)
    for k in SCORE_KEYS:
        got, want = row["after_random"][k], expected[k]
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-9), k
    table = read_csv(out / "results.csv")
    assert float(table[0]["flagged_fraction"]) == 0.125 and float(table[0]["after_random_mIoU-B"]) == row["after_random"]["mIoU-B"]
    assert "random-removal control" in (out / "report.md").read_text()


def test_filters_on_a_semantic_trigger_are_marked_confounded(entries, fgba_11_semantic_path, fgba_line_path):
    import h5py

    from testbed.evaluation.runner import run_defense

    run = entries["deeplabv3_tiny--fgba-n1-line--s0"].run_dir  # same classes as the session's synthetic set
    row = run_defense(DarkFilter(), run, fgba_11_semantic_path, device="cpu", panels=0)
    with h5py.File(fgba_11_semantic_path, "r") as f:
        outside = np.setdiff1d(f["test_attacked/index"][()], f["test_benign/index"][()])
        total = len(f["test_attacked/index"])
    assert outside.size == total > 0  # a semantic trigger: no attacked image is in the benign set
    assert row.detection.confounded.startswith(f"{total} of {total} attacked test images are not in the benign test set")
    assert "(confounded)" in __import__("testbed.bench.workers", fromlist=["summary_line"]).summary_line(row)
    line = run_defense(DarkFilter(), run, fgba_line_path, device="cpu", panels=0)
    assert line.detection.confounded is None


# -- issue 14 item 11: the attack × defense grid ------------------------------------------------------
def test_summary_grid_cells_are_the_means_of_the_rows(zoo, tmp_path):
    out = tmp_path / "g"
    assert bench(zoo, out, f"{ME}:Shrink,{ME}:Brightness", "--min-asr", "0") == 0
    rows = results(out)["rows"]
    report = (out / "report.md").read_text()
    grid = report.split("## Summary: attack × defense")[1].split("## Before / after")[0]
    line = next(l for l in grid.splitlines() if l.startswith("| fgba-n1-line |"))
    mine = [r for r in rows if r["attack"] == "fgba-n1-line" and r["defense"] == "shrink"]
    asr = np.mean([r["after"]["ASR"] for r in mine])
    drop = np.mean([r["after"]["mIoU-B"] - r["before"]["mIoU-B"] for r in mine])
    ders = [r["DER"] for r in mine if r["DER"] is not None]  # no DER where the benign floor was not exceeded
    der = f"{np.mean(ders):.2f}" if ders else "n/a"
    assert f"ASR {asr:.1f} · ΔmIoU-B {drop:+.1f} · DER {der}" in line and "[2]" in line
    said = sum(r["verdict"]["status"] == "backdoored" for r in rows if r["attack"] == "fgba-n1-line" and r["defense"] == "brightness")
    assert f"backdoored {said}/2" in line


def test_docs_results_tables_recompute_from_the_reports(zoo, tmp_path, monkeypatch):
    """docs/make_results.py (which writes docs/results.md from reports copied under docs/results/): its cells are
    the t-intervals of the rows' values."""
    import importlib.util

    import numpy as np
    from scipy import stats as st

    spec = importlib.util.spec_from_file_location("make_results", Path(__file__).resolve().parents[1] / "docs" / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    ref, fpmax = tmp_path / "ref", tmp_path / "max"
    assert bench(zoo, ref, "fine-pruning", "--min-asr", "0") == 0
    assert bench(zoo, fpmax, "fine-pruning", "--param", "ranking=max", "--min-asr", "0") == 0
    mod.collect("bench", "synthetic", ref)
    mod.collect("fp-max", "synthetic", fpmax)
    assert (tmp_path / "results" / "synthetic" / "bench" / "results.csv").is_file()  # the per-seed rows beside it
    text, _, _ = mod.render()
    assert mod.page_with_notes(text, "old\n<!-- notes -->\nhand-written reading\n").endswith("<!-- notes -->\nhand-written reading\n")
    rows = [r for r in results(ref)["rows"] if "fgba-n1-line" in r["model"]]
    x = np.array([r["after"]["ASR"] for r in rows])
    half = st.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if x.std() > 0 else 0.0
    section = text.split("\n#### fine-pruning\n")[1].split("\n#")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| fgba-n1-line |"))
    assert f"{x.mean():.1f} ± {half:.1f} [2]" in line
    assert "Fine-pruning, channels ranked by mean or by max" in text and "| all | 4 |" in text


def test_one_numbered_line_per_pair_and_both_seconds_in_the_report(zoo, tmp_path):
    """Issue 24 (traps 9, 10): each pair's line is numbered with the bench's elapsed seconds, the defense's own
    seconds are labelled, and report.md gives the command's wall time beside the per-row defense seconds."""
    from testbed.bench.run import run_bench

    said = []
    doc = run_bench(tmp_path / "s", f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False,
                    log=said.append, entries="*s0")
    pairs = [m for m in said if m.startswith("[")]
    n = len(doc["rows"])
    assert len(pairs) == n and [m.split(",")[0] for m in pairs] == [f"[{i}/{n}" for i in range(1, n + 1)]
    elapsed = [float(m.split(", ")[1].split(" s elapsed]")[0]) for m in pairs]
    assert elapsed == sorted(elapsed) and all(" defense " in m and m.endswith(" s") for m in pairs)
    wall = doc["meta"]["command_seconds"]
    assert wall >= elapsed[-1] > 0  # the wall time covers every pair
    report_md = (tmp_path / "s" / "report.md").read_text()
    assert f"wall time of this bench: `{wall} s`" in report_md
    # the machine is named in the report: the CPU as the kernel reports it, and the cores this process may use
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    m = doc["meta"]["machine"]
    assert m["cores"] == len(os.sched_getaffinity(0)) and (cpu is None or m["cpu"] == cpu)
    assert f"machine of this bench: {m['cores']} cores of {m['cpu']} (bf16 flags: " in report_md
    assert all("notes" in r for r in doc["rows"])  # always present, empty when there is nothing to note
    # each pair's own wall and CPU seconds cover its defense's; report.md sums the CPU seconds; results.csv has both
    costs, threads = [r["cost"] for r in doc["rows"]], doc["meta"]["threads"]
    assert all(c["pair_seconds"] >= c["seconds"] > 0 and c["pair_cpu_seconds"] > 0 for c in costs)
    # a pair's CPU seconds are its own (no earlier pair's leak in): at most its threads' share of its wall time
    assert all(c["pair_cpu_seconds"] <= c["pair_seconds"] * threads + 0.5 for c in costs)
    assert all(0 <= c["before_cpu_seconds"] <= c["pair_cpu_seconds"] for c in costs)
    assert {c["measured_on"] for c in costs} == {m["cpu"]}
    total = sum(c["pair_cpu_seconds"] for c in costs)
    assert f"CPU time of the pairs: `{total:,.0f} CPU-s` over {n} pair(s)" in report_md
    with open(tmp_path / "s" / "results.csv", newline="") as f:
        assert [float(r["pair_cpu_seconds"]) for r in csv.DictReader(f)] == [c["pair_cpu_seconds"] for c in costs]


def test_cpu_line_puts_before_scoring_apart_and_counts_unrecorded_pairs():
    """By defense: each pair's CPU seconds less the before-scores it happened to pay for (a worker scores a model
    once, in whichever pair runs first); pairs from before the rows recorded CPU time are counted, not summed."""
    from testbed.bench.markdown import cpu_line

    def row(defense, cpu, before, on="Xeon"):
        return {"defense": defense, "cost": {} if cpu is None else {"pair_cpu_seconds": cpu, "before_cpu_seconds": before,
                                                                   "measured_on": on}}

    (line,) = cpu_line([row("a", 1500.0, 1000.0), row("b", 700.0, 0.0, "EPYC"), row("a", 300.0, 0.0), row("b", None, None)])
    assert "`2,500 CPU-s` over 3 pair(s) on EPYC (1 pair), Xeon (2 pairs):" in line  # a resumed bench may span CPUs
    assert "before any defense 1,000;" in line
    assert "controls: a 800, b 700; 1 pair(s) written before pairs recorded it" in line
    assert cpu_line([row("a", None, None)]) == []


# -- issue 20: settings as objects; before-scores cached by what they depend on, not by path -------------------
def _verdict_bench(out: Path, run: Path, data: Path) -> dict:
    """Two verdict defenses (nothing scored after) on one run, through the object call."""
    from testbed.bench import BenchSettings, Execution, ModelSource, ReportOptions, run_bench

    return run_bench(out, [Searcher(), Brightness()], ModelSource(run=run, data=data), BenchSettings(device="cpu", threads=1),
                     execution=Execution(progress=False, log=lambda m: None), report=ReportOptions(figures=False))


def _replace(src: Path, dst: Path) -> None:
    """``dst`` replaced by a copy of ``src`` the way tools replace files (a new file renamed over it)."""
    import os
    import shutil

    shutil.copyfile(src, dst.with_name(dst.name + ".new"))
    os.replace(dst.with_name(dst.name + ".new"), dst)


def test_before_scores_are_cached_by_content_not_by_path(entries, tmp_path, monkeypatch):
    import shutil

    import testbed.evaluation.loaded as loaded
    from testbed.bench import workers
    from testbed.scoring.scorer import score_model
    from testbed.training.runs import load_run

    passes = []
    monkeypatch.setattr(loaded, "score_model", lambda *a, **k: (passes.append(1), score_model(*a, **k))[1])
    monkeypatch.setattr(workers, "_BEFORE", {})
    first, second = (e for e in entries.values() if e.is_benign)  # same classes and architecture, other seeds
    clean = Path(first.data_path)
    poisoned = next(Path(e.data_path) for e in entries.values() if not e.is_benign)
    run, data = tmp_path / "run", tmp_path / "data.h5"
    shutil.copytree(first.run_dir, run)
    shutil.copyfile(clean, data)

    def expected(weights_of: Path, data_file: Path) -> dict:
        model, _ = load_run(weights_of, "cpu")
        full = score_model(model, data_file, "cpu", batch_size=32)
        return {k: full[k] for k in SCORE_KEYS}

    def before(doc: dict) -> dict:
        got = [r["before"] for r in doc["rows"]]
        assert got[0] == got[1]  # both defenses of the model see the same scores
        return {k: got[0][k] for k in SCORE_KEYS}

    assert before(_verdict_bench(tmp_path / "a", run, data)) == expected(first.run_dir, clean)
    assert len(passes) == 1  # one model, two defenses: scored once
    shutil.copytree(run, tmp_path / "copy")  # the same weights and data at another path: the same scores, reused
    assert before(_verdict_bench(tmp_path / "b", tmp_path / "copy", data)) == expected(first.run_dir, clean)
    assert len(passes) == 1
    _replace(Path(second.run_dir) / "model.safetensors", run / "model.safetensors")  # other weights, same path
    want = expected(second.run_dir, clean)
    assert want != expected(first.run_dir, clean)  # the check below can fail
    assert before(_verdict_bench(tmp_path / "c", run, data)) == want
    assert len(passes) == 2
    _replace(poisoned, data)  # other data, same path
    want = expected(second.run_dir, poisoned)
    assert want != expected(second.run_dir, clean)
    assert before(_verdict_bench(tmp_path / "d", run, data)) == want
    assert len(passes) == 3


def test_the_keyword_call_is_the_object_call(zoo, tmp_path):
    """``run_bench(out, defenses, zoo=..., device=..., ...)`` (the earlier call) fills the same objects."""
    from testbed.bench import BenchSettings, Execution, ModelSource, ReportOptions, run_bench

    a = run_bench(tmp_path / "a", f"{ME}:Searcher", zoo=zoo, entries="*s0", device="cpu", seed=3, budget_passes=7,
                  threads=1, figures=False, progress=False, log=lambda m: None, title="same")
    b = run_bench(tmp_path / "b", f"{ME}:Searcher", ModelSource(zoo=zoo, entries="*s0"),
                  BenchSettings(device="cpu", seed=3, budget_passes=7, threads=1),
                  execution=Execution(progress=False, log=lambda m: None), report=ReportOptions(figures=False, title="same"))
    assert [r["settings"] for r in a["rows"]] == [r["settings"] for r in b["rows"]]
    assert a["rows"][0]["settings"]["seed"] == 3 and a["rows"][0]["settings"]["budget_passes"] == 7
    assert [r["model"] for r in a["rows"]] == [r["model"] for r in b["rows"]] and len(a["rows"]) == 2
    for x, y in zip(a["rows"], b["rows"]):
        assert x["before"] == y["before"] and x["verdict"] == y["verdict"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'zooo'"):
        run_bench(tmp_path / "c", f"{ME}:Searcher", zooo=zoo)
    with pytest.raises(TypeError, match="not both"):
        run_bench(tmp_path / "c", f"{ME}:Searcher", ModelSource(zoo=zoo), BenchSettings(), device="cpu")
    c = run_bench(tmp_path / "c", f"{ME}:Searcher", ModelSource(zoo=zoo, entries="*s0"), device="cpu", seed=3,
                  budget_passes=7, threads=1, figures=False, progress=False, log=lambda m: None, title="same")
    assert [r["settings"] for r in c["rows"]] == [r["settings"] for r in a["rows"]]  # a source object + keywords
    with pytest.raises(TypeError, match="entries= given beside a ModelSource"):
        run_bench(tmp_path / "d", f"{ME}:Searcher", ModelSource(zoo=zoo), entries="*s0")


def test_one_bench_pair_on_a_zoo_entry_reads_the_weights_once(zoo, entries, tmp_path, reads, monkeypatch):
    """The acceptance count of issue 20: for one pair of a zoo bench, the weights file is loaded once and the data
    file opened at most twice (the classes check before any work, then the pair's one open)."""
    from testbed.bench import BenchSettings, Execution, ModelSource, ReportOptions, run_bench
    from testbed.bench import workers

    monkeypatch.setattr(workers, "_BEFORE", {})
    eid = next(i for i, e in entries.items() if not e.is_benign and i.endswith("s0"))
    reads.clear()
    doc = run_bench(tmp_path / "one", [Shrink()], ModelSource(zoo=zoo, entries=eid), BenchSettings(device="cpu", threads=1),
                    execution=Execution(progress=False, log=lambda m: None), report=ReportOptions(figures=False))
    assert [r["error"] for r in doc["rows"]] == [None]
    data = Path(entries[eid].data_path).name
    assert reads["weights:model.safetensors"] == 1
    assert reads[f"h5:{data}"] <= 2, reads


# -- issue 24 (walkthrough): a false "merged report" alarm, bar labels without parameters, the benign floor ------
def test_one_bench_of_two_parametrised_defenses_is_no_merged_report_and_figures_use_the_table_labels(
        zoo, tmp_path, monkeypatch):
    import testbed.bench.plots as plots
    from testbed.bench.run import run_bench

    seen: dict[str, list[str]] = {}
    save = plots._save

    def spy(fig, path):  # every text of the figure's axes: tick labels and titles
        seen[Path(path).name] = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()] + [
            ax.get_title() for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    out = tmp_path / "two"
    run_bench(out, [f"{ME}:Shrink", f"{ME}:Scale"], zoo=zoo, device="cpu", progress=False, log=lambda m: None,
              entries="*s0", params={f"{ME}:Scale": {"factor": 0.9}})
    report = (out / "report.md").read_text()
    assert "| scale[factor=0.9] |" in report.split("## Before / after")[1]  # the tables' label
    assert "figure_errors" not in results(out)
    bars = seen["bars--deeplabv3_tiny--fgba-n1-line--s0.png"]
    assert bars[:2] == ["shrink", "scale[factor=0.9]"] and bars[2:4] == ["shrink", "scale[factor=0.9]"]  # ASR, mIoU-B
    assert "after scale[factor=0.9]" in seen["panels--deeplabv3_tiny--fgba-n1-line--s0.png"]
    assert "Merged report" not in report and "different" not in report.split("## Summary")[0]

    # the same defense with another parameter set, on the other seed, merged into the report: now the note fires
    run_bench(out, [f"{ME}:Scale"], zoo=zoo, device="cpu", progress=False, log=lambda m: None, figures=False,
              entries="*s1", params={f"{ME}:Scale": {"factor": 0.8}})
    head = (out / "report.md").read_text().split("## Summary")[0]
    assert "**Merged report**" in head
    assert "- scale was run with 2 parameter sets (scale[factor=0.9], scale[factor=0.8])" in head
    assert "different bench settings" not in head  # seed, budgets, --min-asr: the same in every row


def test_the_merged_report_note_names_the_bench_settings_that_differ():
    from testbed.bench.markdown import settings_warning
    from testbed.stats.rows import identify

    def row(model, defense, seed, params):
        return {"model": model, "defense": defense, "settings": {"seed": seed, "budget_s": None, "device": "cpu",
                                                                 "threads": 2, "defense": defense, "params": params}}

    same = identify([row("a", "ft", 0, {"epochs": 2}), row("a", "median-filter", 0, {}),
                     row("b", "ft", 0, {"epochs": 2}), {**row("b", "median-filter", 0, {}), "settings": {
                         **row("b", "median-filter", 0, {})["settings"], "device": "cuda", "threads": 1}}])
    assert settings_warning(same, {}) == []  # parameters of two defenses, or where a row ran: no alarm
    seeds = identify([row("a", "ft", 0, {"epochs": 2}), row("b", "ft", 1, {"epochs": 2})])
    assert settings_warning(seeds, {"rows_from_earlier_runs": 1}) == [
        "", "**Merged report**", "",
        "- 1 of 2 rows come from earlier benches into this report (kept when this one ran other models or defenses).",
        "- the rows were run with 2 different bench settings (seed 0, 1); each row's `settings` in results.json says "
        "which."]


def test_a_zoo_bench_records_the_benign_floor_and_gives_no_der_at_or_below_it(zoo, entries, tmp_path):
    """The zoo's benign model of the same architecture and seed scores ASR F on an attacked entry's test set: an
    entry whose ASR before does not exceed F measures no backdoor (here the one-epoch models: 0.0 ≤ 0.0)."""
    out = tmp_path / "floor"
    assert bench(zoo, out, f"{ME}:Shrink", "--min-asr", "0") == 0
    rows = results(out)["rows"]
    attacked = [r for r in rows if not r["benign_model"]]
    assert len(attacked) == 2 and all("benign_floor" not in r for r in rows if r["benign_model"])
    for r in attacked:
        benign = entries[f"deeplabv3_tiny--benign--s{r['seed']}"]
        floor = benign.metrics["reference"]["fgba-n1-line"]["ASR"]
        assert r["benign_floor"] == {"entry": benign.id, "ASR": floor}
        no_gain = r["before"]["ASR"] <= floor
        assert no_gain  # this zoo's one-epoch models: the attacked ASR is no higher than the benign one
        assert r["attack_implanted"] is False and r["DER"] is None and r.get("DER_random") is None
        assert r["notes"][0] == (f"DER n/a: no gain over the benign model: ASR {r['before']['ASR']:.1f}% before any "
                                 f"defense is not above the {floor:.1f}% that the zoo's benign model {benign.id} "
                                 "scores on the same attacked test set, so it measures no backdoor")
    report = (out / "report.md").read_text()
    assert report.count("| n/a³ |") == 2 and "³ DER n/a: no gain over the benign model." in report
    for r in attacked:  # the floor, which no table shows, in the row's note
        assert f"- {r['model']} × shrink: {r['notes'][0]}" in report
    assert "¹ DER n/a" not in report  # --min-asr 0: no row fell below it


def _judged(asr: float, floor: dict | None, min_asr: float = 50.0):
    from testbed.bench.workers import PairJob, _finish_row
    from testbed.evaluation.rows import DefenseRow

    row = DefenseRow(model="m--iba--s0", attack="iba", defense="ft", run="r", data="d.h5",
                     before={"ASR": asr, "mIoU-B": 22.9}, after={"ASR": 10.0, "mIoU-B": 22.0}, der=0.9, der_random=0.6)
    model = {"id": "m--iba--s0", "is_benign": False, **({"benign_floor": floor} if floor else {})}
    job = PairJob(out="o", pid="p", model=model, defense="ft", name="ft", params={}, settings={"min_asr": min_asr}, key={})
    _finish_row(row, job, False, None)
    return row


def test_the_benign_floor_judges_only_what_the_absolute_guard_let_through():
    from testbed.bench.markdown import der_cell
    from testbed.bench.workers import summary_line

    floor = {"entry": "m--benign--s0", "ASR": 83.7}
    walk = _judged(80.5, floor)  # the walkthrough's IBA entry: 80.5% ≥ --min-asr 50, but the benign model scores 83.7%
    assert (walk.attack_implanted, walk.der, walk.der_random, walk.benign_floor) == (False, None, None, floor)
    assert walk.notes[0].startswith("DER n/a: no gain over the benign model: ASR 80.5% before any defense is not above "
                                    "the 83.7% that the zoo's benign model m--benign--s0 scores")
    assert der_cell(walk.to_json()) == "n/a³" and walk.to_json()["benign_floor"] == floor
    assert "DER n/a (no gain over the benign model's ASR 83.7)" in summary_line(walk)
    gain = _judged(83.8, floor)  # above the floor: implanted, DER kept, the floor still recorded
    assert (gain.attack_implanted, gain.der, gain.notes, gain.to_json()["benign_floor"]) == (True, 0.9, [], floor)
    low = _judged(40.0, floor)  # below --min-asr: that reason, as before
    assert low.attack_implanted is False and low.notes[0].startswith("DER n/a: the attack did not implant")
    assert der_cell(low.to_json()) == "n/a¹" and "n/a (attack did not implant)" in summary_line(low)
    plain = _judged(80.5, None)  # no floor (a --run bench, a zoo without its benign model): unchanged
    assert plain.attack_implanted is True and plain.der == 0.9 and "benign_floor" not in plain.to_json()


def test_benign_floors_match_architecture_seed_and_training_axes():
    from types import SimpleNamespace

    from testbed.bench.run import benign_floors

    def entry(eid, attack, seed, epochs, reference=None):
        metrics = {"reference": reference} if reference is not None else {}
        return SimpleNamespace(id=eid, attack_id=attack, seed=seed, is_benign=attack == "benign", metrics=metrics,
                               group={"model": eid.split("--")[0], "attack": attack, "epochs": epochs})

    zoo = [entry("a--benign--s0--epochs-2", "benign", 0, 2, {"iba": {"ASR": 83.7}, "fgba": {"ASR": 1.5}}),
           entry("a--benign--s0--epochs-4", "benign", 0, 4, {"iba": {"ASR": 12.0}}),
           entry("a--benign--s1--epochs-2", "benign", 1, 2, {}),
           entry("a--iba--s0--epochs-2", "iba", 0, 2), entry("a--iba--s0--epochs-4", "iba", 0, 4),
           entry("a--fgba--s0--epochs-4", "fgba", 0, 4),  # its benign model has no reference score for fgba
           entry("a--iba--s1--epochs-2", "iba", 1, 2), entry("b--iba--s0--epochs-2", "iba", 0, 2)]
    assert benign_floors(zoo) == {"a--iba--s0--epochs-2": {"entry": "a--benign--s0--epochs-2", "ASR": 83.7},
                                  "a--iba--s0--epochs-4": {"entry": "a--benign--s0--epochs-4", "ASR": 12.0}}


def test_a_defense_whose_revision_changed_is_run_again(zoo, tmp_path, monkeypatch):
    """A class attribute ``revision`` (set when a defense's results change under the same parameters) is part of
    each pair's key: the pairs of the older code are replaced and rerun, not merged with the new ones."""
    from testbed.bench.run import run_bench

    out = tmp_path / "r"
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=lambda m: None,
              entries="*s0")
    pairs = sorted(p for p in (out / "pairs").glob("*--brightness--*.json") if not p.name.endswith(".time.json"))
    assert pairs and all("revision" not in json.loads(p.read_text())["key"] for p in pairs)
    monkeypatch.setattr(Brightness, "revision", 2, raising=False)
    said = []
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append,
              entries="*s0")
    (line,) = [m for m in said if m.startswith("replacing")]
    assert line.startswith(f"replacing {len(pairs)} finished pair(s)") and "the defense's revision None → 2" in line
    assert all(json.loads(p.read_text())["key"]["revision"] == 2 for p in pairs)
    said.clear()  # the same revision again: nothing to do
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append,
              entries="*s0")
    assert any("nothing to do" in m for m in said) and not any(m.startswith("replacing") for m in said)


def test_pairs_of_other_models_at_an_older_revision_are_left_out_of_the_report(zoo, tmp_path, monkeypatch):
    """A bench over some models, at a new revision, into a report that holds the defense's older pairs of other
    models: the report is made of one revision only (the older pairs stay on disk, named in one line), so old and
    new results of one defense are never aggregated or compared together."""
    from testbed.bench.run import run_bench

    out = tmp_path / "mixed"
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=lambda m: None)
    every = {r["model"] for r in results(out)["rows"]}
    s0 = {m for m in every if m.endswith("s0")}
    assert s0 and every - s0
    monkeypatch.setattr(Brightness, "revision", 2, raising=False)
    said = []
    run_bench(out, f"{ME}:Brightness", zoo=zoo, device="cpu", figures=False, progress=False, log=said.append,
              entries="*s0")
    doc = results(out)
    assert {r["model"] for r in doc["rows"]} == s0
    older = sorted(doc["meta"]["left_out_older_revision"])
    files = [p.stem for p in (out / "pairs").glob("*.json") if not p.name.endswith(".time.json")]
    assert older == sorted(f for f in files if not any(f.startswith(f"{m}--") for m in s0))  # left on disk
    assert len(older) == len(every - s0)
    (line,) = [m for m in said if m.startswith("left out of the report")]
    assert f"{len(older)} pair(s)" in line
