"""`testbed defend` / `testbed bench`: exit codes, every report file, and numbers recomputed from the files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from testbed.cli import main
from testbed.defense import DefenseResult, Verdict

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "outside_defense"
SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")
ME = __name__


def dark_fraction(images):
    return (np.asarray(images).min(-1) < 30).mean(axis=(1, 2)).astype(np.float64)


class DarkFilter:
    name = "dark-filter"

    def run(self, model, ctx):
        return DefenseResult(input_scores=dark_fraction, threshold=float(np.quantile(dark_fraction(ctx.clean_images), 0.9)),
                             details={"clean_scores": dark_fraction(ctx.clean_images).tolist()})


class Brightness:
    """A verdict defense: 'backdoored' when the clean subset is darker than ``limit`` (a coin, but a deterministic one)."""

    name = "brightness"

    def __init__(self, limit: float = 0.5):
        self.limit = limit

    def run(self, model, ctx):
        score = 1.0 - float(ctx.clean_images.mean()) / 255
        return DefenseResult(verdict=Verdict(backdoored=score > self.limit, score=score))


class Crasher:
    name = "crasher"

    def run(self, model, ctx):
        raise RuntimeError("deliberate failure")


class FlagFirst:
    """Flags training sample 0 (the runner then retrains without it)."""

    name = "flag-first"

    def run(self, model, ctx):
        return DefenseResult(flagged_train=np.array([0]))


class BadCurve:
    """A curve whose x values are not numbers: its figure cannot be drawn."""

    name = "bad-curve"

    def run(self, model, ctx):
        return DefenseResult(details={"curve": [{"fraction": "not a number", "miou_clean": 0.5}]})


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def der(before, after):
    return (max(0.0, (before["ASR"] - after["ASR"]) / 100) - max(0.0, (before["mIoU-B"] - after["mIoU-B"]) / 100) + 1) / 2


def test_unknown_defense_exits_2_without_output(backdoored_run, fgba_line_path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["defend", str(backdoored_run), "--data", str(fgba_line_path), "--defense", "fine-pruning,stirp", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown defense 'stirp'" in err and "did you mean 'strip'" in err and "Traceback" not in err
    assert not out.exists()
    rc = main(["bench", "--run", str(backdoored_run), "--defense", "strip", "--out", str(out)])
    assert rc == 2 and "--data" in capsys.readouterr().err
    rc = main(["bench", "--run", str(backdoored_run), "--data", str(fgba_line_path), "--defense", "strip",
               "--param", "fine-pruning.step=0.1", "--out", str(out)])
    assert rc == 2 and "not one of the --defense names" in capsys.readouterr().err
    assert not out.exists()


def test_bench_writes_every_file(backdoored_run, fgba_line_path, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = tmp_path / "report"
    defenses = [f"{ME}:DarkFilter", "median_filter_defense:MedianFilter", f"{ME}:Brightness", f"{ME}:Crasher"]
    rc = main(["-q", "bench", "--run", str(backdoored_run), "--data", str(fgba_line_path), "--defense", ",".join(defenses),
               "--param", "median_filter_defense:MedianFilter.size=3", "--param", f"{ME}:Brightness.limit=0.1",
               "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # the crasher failed; the others still ran and the report was written
    assert "1 defense run(s) failed" in captured.err
    for name in ("report.md", "results.json", "results.csv", "scores.csv"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")]  # no temp dir left behind

    doc = json.loads((out / "results.json").read_text())
    rows = {r["defense"]: r for r in doc["rows"]}
    assert list(rows) == ["dark-filter", "median-filter", "brightness", "crasher"]
    for r in doc["rows"]:
        for key in ("model", "attack", "defense", "before", "after", "detection", "cost", "DER", "details"):
            assert key in r, key
        assert set(SCORE_KEYS) <= set(r["before"])
        assert isinstance(r["cost"]["seconds"], float)
        if r["after"] is not None:
            assert set(SCORE_KEYS) <= set(r["after"])
            assert r["DER"] == pytest.approx(der(r["before"], r["after"]), abs=1e-12)
    assert rows["crasher"]["error"] == "RuntimeError: deliberate failure" and rows["crasher"]["after"] is None
    assert all(rows[n]["error"] is None for n in ("dark-filter", "median-filter", "brightness"))
    assert rows["brightness"]["verdict"]["backdoored"] is True and rows["brightness"]["after"] is None
    assert rows["median-filter"]["details"] == {"size": 3}
    assert rows["dark-filter"]["detection"] is not None and rows["median-filter"]["detection"] is None
    # each pair names the bytes of the model it ran on (pairs merged from other machines stay checkable)
    weights = hashlib.sha256((backdoored_run / "model.safetensors").read_bytes()).hexdigest()
    keys = [json.loads(p.read_text())["key"] for p in (out / "pairs").glob("*.json") if not p.name.endswith(".time.json")]
    assert len(keys) == 4 and all(k["model"]["weights_sha256"] == weights for k in keys)

    # the filter's detection numbers, recomputed from scores.csv
    from sklearn.metrics import roc_auc_score

    header, scores = read_csv(out / "scores.csv")
    assert header[:4] == ["split", "index", "score", "flagged"]
    mine = [s for s in scores if s["defense"] == "dark-filter"]
    assert len(mine) == len(scores) > 0
    det = rows["dark-filter"]["detection"]
    y = np.array([s["split"] == "test_attacked" for s in mine], dtype=int)
    v = np.array([float(s["score"]) for s in mine])
    flagged = np.array([int(s["flagged"]) for s in mine])
    np.testing.assert_array_equal(flagged, (v > det["threshold"]).astype(int))
    assert det["auroc"] == pytest.approx(roc_auc_score(y, v), abs=1e-12)
    assert det["tpr"] == pytest.approx(flagged[y == 1].mean(), abs=1e-12)
    assert det["fpr"] == pytest.approx(flagged[y == 0].mean(), abs=1e-12)
    with h5py.File(fgba_line_path, "r") as f:  # the scores belong to the images they name
        benign_index = f["test_benign/index"][()]
        attacked = dark_fraction(f["test_attacked/images"][()])
        test = dark_fraction(f["test/images"][()])
    rows_b = [s for s in mine if s["split"] == "test_benign"]
    rows_a = [s for s in mine if s["split"] == "test_attacked"]
    assert [int(s["index"]) for s in rows_b] == benign_index.tolist()
    np.testing.assert_allclose([float(s["score"]) for s in rows_b], test[benign_index])
    np.testing.assert_allclose([float(s["score"]) for s in rows_a], attacked[[int(s["index"]) for s in rows_a]])

    # results.csv: one row per model × defense, the same numbers as results.json
    header, table = read_csv(out / "results.csv")
    for col in ("model", "attack", "defense", "DER", "tpr", "fpr", "auroc", "seconds",
                *[f"before_{k}" for k in SCORE_KEYS], *[f"after_{k}" for k in SCORE_KEYS]):
        assert col in header, col
    assert [t["defense"] for t in table] == list(rows)
    for t in table:
        r = rows[t["defense"]]
        assert float(t["before_ASR"]) == pytest.approx(r["before"]["ASR"])
        if r["after"] is not None:
            assert float(t["after_mIoU-B"]) == pytest.approx(r["after"]["mIoU-B"])
            assert float(t["DER"]) == pytest.approx(r["DER"])
    assert float(table[0]["auroc"]) == pytest.approx(det["auroc"])

    # figures: panels, before/after bars, the filter's score histogram
    figs = {p.name for p in (out / "figures").glob("*.png")}
    model = backdoored_run.name
    for name in (f"panels--{model}.png", f"bars--{model}.png", f"scores--{model}--dark-filter.png"):
        assert name in figs, (name, figs)
        with Image.open(out / "figures" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    report = (out / "report.md").read_text()
    for word in ("dark-filter", "median-filter", "brightness", "crasher", "deliberate failure", f"figures/panels--{model}.png"):
        assert word in report


def test_defend_by_entry_point_and_verdicts_across_models(backdoored_run, fgba_line_path, synth_path, tmp_path,
                                                         monkeypatch, capsys):
    """An installed plugin (a dist-info on sys.path) runs by name; verdicts are scored across models."""
    from sklearn.metrics import roc_auc_score

    from testbed.bench.run import BenchModel, run_bench

    dist = tmp_path / "plugins" / "median_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: median-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[testbed.defenses]\nmedian-plugin = median_filter_defense:MedianFilter\n")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(dist.parent))
    out = tmp_path / "defended"
    rc = main(["-q", "defend", str(backdoored_run), "--data", str(fgba_line_path), "--defense", "median-plugin",
               "--param", "median-plugin.size=5", "--device", "cpu", "--no-figures", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["defense"] == "median-filter" and row["details"] == {"size": 5} and row["error"] is None
    assert row["DER"] == pytest.approx(der(row["before"], row["after"]), abs=1e-12)

    # three "models": the backdoored one on its data, and on the clean set (no /defense/clean_index there:
    # a seeded 5% of /train stands in); labels are what the verdict table scores against
    models = [BenchModel("bd", backdoored_run, fgba_line_path, "fgba", False),
              BenchModel("clean-data", backdoored_run, synth_path, "benign", True)]
    doc = run_bench(tmp_path / "verdicts", [Brightness(limit=0.6)], models=models, device="cpu", figures=False,
                    progress=False, log=lambda msg: None)
    rows = doc["rows"]
    truth = [0 if r["benign_model"] else 1 for r in rows]
    said = [int(r["verdict"]["backdoored"]) for r in rows]
    (summary,) = doc["verdicts"]
    assert summary["models"] == 2 and summary["benign"] == 1 and summary["backdoored"] == 1
    assert summary["accuracy"] == pytest.approx(np.mean(np.array(truth) == np.array(said)))
    assert summary["auroc"] == pytest.approx(roc_auc_score(truth, [r["verdict"]["score"] for r in rows]))
    assert rows[1]["before"]["ASR"] is None and rows[1]["after"] is None  # clean data: nothing attacked to score
    assert "Detection across models" in (tmp_path / "verdicts" / "report.md").read_text()


def test_testbed_errors_are_not_reported_as_the_defenses(backdoored_run, fgba_line_path, tmp_path, monkeypatch, capsys):
    """A failure of the testbed's retraining or figures is a testbed error: named so, exit 1, the rest still written."""
    import testbed.evaluation.runner

    def broken_retrain(*args, **kwargs):
        raise RuntimeError("retraining broke")

    monkeypatch.setattr(testbed.evaluation.runner, "retrain_without", broken_retrain)
    out = tmp_path / "report"
    rc = main(["-q", "bench", "--run", str(backdoored_run), "--data", str(fgba_line_path), "--defense",
               f"{ME}:FlagFirst,{ME}:BadCurve", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "testbed error" in err and "defense run(s) failed" not in err
    doc = json.loads((out / "results.json").read_text())
    rows = {r["defense"]: r for r in doc["rows"]}
    assert (rows["flag-first"]["error"], rows["flag-first"]["error_source"]) == ("RuntimeError: retraining broke", "testbed")
    assert rows["flag-first"]["flagged"]["count"] == 1
    assert (rows["bad-curve"]["error"], rows["bad-curve"]["error_source"]) == (None, None)
    (failed,) = doc["figure_errors"]
    assert failed["defense"] == "bad-curve" and failed["figure"] == f"curve--{backdoored_run.name}--bad-curve.png"
    assert failed["error"].startswith("ValueError")
    assert (out / "figures" / f"panels--{backdoored_run.name}.png").is_file()  # the other figures were drawn
    report = (out / "report.md").read_text()
    assert "flag-first (testbed error): `RuntimeError: retraining broke`" in report and "figure curve--" in report


def test_verdicts_view_matches_sklearn():
    """results.json "verdicts": the point estimates of "detection" (one computation, testbed.stats), checked by hand."""
    from sklearn.metrics import roc_auc_score

    from testbed.bench.report import results_document

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 20)
    scores = rng.normal(truth, 1.0)
    rows = [{"model": f"m{i}", "attack": "a", "defense": "d", "benign_model": not t, "error": None,
             "verdict": {"backdoored": bool(s > 0.5), "score": float(s), "status": "backdoored" if s > 0.5 else "clean"}}
            for i, (t, s) in enumerate(zip(truth, scores))]
    rows.append({"model": "m-failed", "attack": "a", "defense": "d", "benign_model": True, "verdict": None, "error": "x"})
    rows.append({"model": "m-inc", "attack": "a", "defense": "d", "benign_model": False, "error": None,
                 "verdict": {"backdoored": False, "score": 9.0, "status": "inconclusive"}})
    doc = results_document(rows, {"seed": 0})
    (v,) = doc["verdicts"]
    said = scores > 0.5
    assert v["models"] == 21 and v["inconclusive"] == 1  # failed runs are not counted; inconclusive apart
    assert v["accuracy"] == pytest.approx(np.mean(said == truth.astype(bool)))
    assert v["tpr"] == pytest.approx(said[truth == 1].mean()) and v["fpr"] == pytest.approx(said[truth == 0].mean())
    assert v["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert doc["detection"][0]["accuracy"]["value"] == v["accuracy"]


def test_help_lists_examples(capsys):
    for cmd in ("defend", "bench"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "--defense" in text and "--budget" in text


ZOO_SPEC = """
[data]
synth = { n_train = 32, n_test = 8, size = 64, seed = 0 }
[train]
epochs = 1
batch_size = 16
[[attack]]
id = "benign"
[[attack]]
id = "fgba-n1-line"
attack = "fgba"
preset = "n-to-1"
target = "wall"
trigger = "line"
rate = 0.25
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign", "fgba-n1-line"]
seed = [0]
"""


def test_bench_zoo(tmp_path, capsys):
    """`bench --zoo`: one row per entry × defense, entry ids and attack ids from the zoo, verdicts across entries."""
    import testbed.zoo

    spec = tmp_path / "zoo.toml"
    spec.write_text(ZOO_SPEC)
    assert main(["-q", "zoo", "build", str(spec), "--out", str(tmp_path / "zoo")]) == 0, capsys.readouterr().err
    entries = list(testbed.zoo.open(tmp_path / "zoo"))
    from testbed.bench.run import zoo_models  # --entries: one glob, or several separated by commas

    ids = [e.id for e in entries]
    assert [m.id for m in zoo_models(tmp_path / "zoo", "*--benign--*")] == [i for i in ids if "--benign--" in i]
    assert [m.id for m in zoo_models(tmp_path / "zoo", "*--benign--*, *-line--s0")] == ids
    out = tmp_path / "bench"
    rc = main(["-q", "bench", "--zoo", str(tmp_path / "zoo"), "--defense", f"{ME}:Brightness,{ME}:DarkFilter",
               "--param", f"{ME}:Brightness.limit=0.0", "--device", "cpu", "--no-figures", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    got = [(r["model"], r["attack"], r["benign_model"], r["defense"]) for r in doc["rows"]]
    assert got == [(e.id, e.attack_id, e.is_benign, d) for e in entries for d in ("brightness", "dark-filter")]
    (v,) = doc["verdicts"]  # limit 0: every model called backdoored → accuracy = share of backdoored entries
    assert v["models"] == len(entries) and v["accuracy"] == pytest.approx(np.mean([not e.is_benign for e in entries]))
    assert v["fpr"] == 1.0 and v["tpr"] == 1.0
    _, table = read_csv(out / "results.csv")
    assert len(table) == 2 * len(entries)
    filt = [r for r in doc["rows"] if r["defense"] == "dark-filter"]
    benign_row = next(r for r in filt if r["benign_model"])
    attacked_row = next(r for r in filt if not r["benign_model"])
    assert benign_row["detection"]["tpr"] is None and benign_row["detection"]["auroc"] is None  # clean data: no attacked inputs
    assert attacked_row["detection"]["auroc"] is not None
    # what statistics over seeds group by: the entry's seed, its grid point but seed, the attack's parameters
    for r in doc["rows"]:
        attack = "benign" if r["benign_model"] else "fgba-n1-line"
        assert r["model"] == f"deeplabv3_tiny--{attack}--s0"
        assert (r["seed"], r["group"]) == (0, {"model": "deeplabv3_tiny", "attack": attack})
        with h5py.File(r["data"], "r") as f:
            record = json.loads(f.attrs["attack"]) if "attack" in f.attrs else None
        assert r["attack_params"] == (None if r["benign_model"] else record["params"])
    assert attacked_row["attack_params"]["target"] == "wall" and attacked_row["attack_params"]["preset"] == "n-to-1"


def test_exported_pairs_merge_into_a_later_bench(backdoored_run, fgba_line_path, tmp_path, monkeypatch, capsys):
    """A bench on one machine, its pairs exported (no panels), a bench with another defense elsewhere: the later
    report holds every row, the earlier ones equal to what the first report wrote."""
    from safetensors.numpy import load_file

    from testbed.bench.store import export_pairs
    from testbed.core.errors import UserError

    first, later = tmp_path / "first", tmp_path / "later"
    base = ["-q", "bench", "--run", str(backdoored_run), "--data", str(fgba_line_path), "--device", "cpu",
            "--no-figures", "--defense"]
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert main([*base, f"{ME}:DarkFilter,median_filter_defense:MedianFilter", "--out", str(first)]) == 0
    assert export_pairs(first, later / "pairs") == 2
    def panels(report: Path) -> list[str]:  # an empty arrays file is a pair with no arrays
        return [k for f in (report / "pairs").glob("*.safetensors") if f.stat().st_size
                for k in load_file(str(f)) if "panel" in k]

    assert panels(first) and not panels(later)  # the images stay behind
    capsys.readouterr()
    assert main([*base, f"{ME}:Brightness", "--out", str(later)]) == 0
    rows = json.loads((later / "results.json").read_text())["rows"]
    earlier = {r["defense"]: r for r in json.loads((first / "results.json").read_text())["rows"]}
    assert sorted(r["defense"] for r in rows) == ["brightness", "dark-filter", "median-filter"]
    for r in rows:
        if r["defense"] in earlier:
            assert r == earlier[r["defense"]]
    # a merged pair whose key matches (settings, paths, weights) is not run again; nor one written before keys
    # named the weights (its key lacks weights_sha256); a model with other bytes is
    for f in (later / "pairs").glob("*.json"):
        if not f.name.endswith(".time.json") and "dark-filter" in f.name:
            doc = json.loads(f.read_text())
            del doc["key"]["model"]["weights_sha256"]
            f.write_text(json.dumps(doc))
    again = [*base, f"{ME}:DarkFilter,median_filter_defense:MedianFilter", "--out", str(later)]
    capsys.readouterr()
    assert main(again[1:]) == 0
    assert "2 of 2 pairs already finished" in capsys.readouterr().err
    for f in (later / "pairs").glob("*median-filter*.json"):
        if not f.name.endswith(".time.json"):
            doc = json.loads(f.read_text())
            doc["key"]["model"]["weights_sha256"] = "0" * 64
            f.write_text(json.dumps(doc))
    assert main(again[1:]) == 0
    err = capsys.readouterr().err
    assert "replacing 1 finished pair(s)" in err and "median-filter on" in err and "the model's files" in err
    # exporting again replaces the folder (no stale pair stays); a count that does not match changes nothing
    assert len(list((later / "pairs").glob("*brightness*.json"))) == 2  # .json and .time.json
    assert export_pairs(first, later / "pairs") == 2 and not list((later / "pairs").glob("*brightness*"))
    before = sorted((p.name, p.read_bytes()) for p in (later / "pairs").iterdir())
    with pytest.raises(UserError, match="2 readable pairs in pairs/ for 3 rows"):
        export_pairs(later, later / "pairs", expect=3)
    assert sorted((p.name, p.read_bytes()) for p in (later / "pairs").iterdir()) == before
    assert not [p for p in later.iterdir() if p.name.startswith("pairs.")]  # no staging folder left
