"""The defense runner: threat-model boundary, scoring of each result kind, loading defenses from anywhere."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from testbed.defense import DefenseResult, Verdict
from testbed.defenses.registry import load_defense, parse_params
from testbed.training import runs
from testbed.evaluation.runner import run_defense
from testbed.evaluation.threat_model import make_context
from testbed.core import safeload
from testbed.core.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "outside_defense"
CONTEXT_FIELDS = {"clean_images", "clean_labels", "classes", "device", "seed", "budget_s", "budget_passes", "train", "image_size",
                  "ignore_index", "progress"}
SECRETS = ("poison_index", "original_images", "original_labels", "attack", "trigger", "test_attacked", "attacked_images",
           "target", "data_path", "path")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dark_fraction(images: np.ndarray) -> np.ndarray:
    """Share of near-black pixels: a crude, imperfect detector of the black-line trigger."""
    return (np.asarray(images).min(-1) < 30).mean(axis=(1, 2)).astype(np.float64)


class Spy:
    """A malicious defense: looks for the attacker's secrets, tries to smuggle attributes, vandalizes its model."""

    name = "spy"

    def __init__(self, declare: bool = False) -> None:
        self.uses_training_set = declare
        self.seen: dict = {}

    def run(self, model, ctx):
        seen = self.seen
        seen["fields"] = {f.name for f in dataclasses.fields(ctx)}
        seen["secrets"] = {s: getattr(ctx, s, None) for s in SECRETS}
        try:
            ctx.poison_index = np.arange(3)  # type: ignore[misc]
            seen["set_attr"] = "allowed"
        except dataclasses.FrozenInstanceError:
            seen["set_attr"] = "refused"
        seen["train"] = ctx.train
        seen["clean"] = (ctx.clean_images.copy(), ctx.clean_labels.copy())
        seen["ctx"] = ctx
        ctx.clean_images[:] = 0  # scribbling on its own copy must not reach anything else
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return DefenseResult(model=model)


class Identity:
    name = "identity"

    def run(self, model, ctx):
        ctx.progress(0.5, "half way")
        return DefenseResult(model=model, verdict=Verdict(backdoored=True, score=1.5, suspected=[("*", "wall")]))


class DarkFilter:
    name = "dark-filter"

    def run(self, model, ctx):
        return DefenseResult(input_scores=dark_fraction, threshold=float(np.quantile(dark_fraction(ctx.clean_images), 0.9)))


class Sleeper:
    name = "sleeper"

    def run(self, model, ctx):
        self.budget = ctx.budget_s
        time.sleep(0.3)
        return DefenseResult(verdict=Verdict(backdoored=False, score=0.0))


class Crasher:
    name = "crasher"

    def run(self, model, ctx):
        raise RuntimeError("boom")


class FlagDark:
    """A training-set defense: flags the training images with the most near-black pixels."""

    name = "flag-dark"
    uses_training_set = True

    def run(self, model, ctx):
        scores = dark_fraction(ctx.train.images[:])
        return DefenseResult(flagged_train=np.flatnonzero(scores > np.quantile(scores, 0.85)))


@pytest.fixture(scope="module")
def before(backdoored_run, fgba_line_path):
    """The original model's scores, computed once (the runner accepts them to skip re-scoring)."""
    from testbed.training.runs import load_run
    from testbed.scoring.scorer import score_model

    return score_model(load_run(backdoored_run, "cpu")[0], fgba_line_path)


@pytest.fixture(scope="module")
def small_poisoned(tmp_path_factory):
    """A smaller poisoned set and a one-epoch model on it: cheap enough to retrain inside a test."""
    from testbed import attacks
    from testbed.data.synth import make_synth_dataset
    from testbed.training.loop import TrainConfig, train

    d = tmp_path_factory.mktemp("small")
    clean = make_synth_dataset(d / "clean.h5", n_train=64, n_test=16, size=64, seed=1)
    data = attacks.poison_file(clean, d / "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                               rate=0.2, seed=1)
    run = train(data, d / "run", TrainConfig(model="deeplabv3_tiny", epochs=1, batch_size=16, seed=0, device="cpu"),
                progress=False)
    return run, data


# -- the threat model --------------------------------------------------------------------------------
def test_context_gives_only_the_clean_subset(backdoored_run, fgba_line_path, before):
    weights = backdoored_run / "model.safetensors"
    digest = sha256(weights)
    spy = Spy(declare=False)
    row = run_defense(spy, backdoored_run, fgba_line_path, device="cpu", panels=0)  # computes "before" itself
    assert row["before"] == {k: before[k] for k in ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")}
    seen = spy.seen
    assert row["error"] is None
    assert seen["fields"] == CONTEXT_FIELDS  # nothing was added beyond what the threat model allows
    assert all(v is None for v in seen["secrets"].values()), seen["secrets"]
    assert seen["set_attr"] == "refused"
    assert seen["train"] is None  # not declared → no training set
    with h5py.File(fgba_line_path, "r") as f:
        clean_index = f["defense/clean_index"][()]
        poison = f["train/poison_index"][()]
        expected_images = f["train/images"][()][clean_index]
        expected_labels = f["train/labels"][()][clean_index]
        classes_attr = f.attrs["classes"]
    assert np.intersect1d(clean_index, poison).size == 0
    np.testing.assert_array_equal(seen["clean"][0], expected_images)
    np.testing.assert_array_equal(seen["clean"][1], expected_labels)
    assert seen["ctx"].classes == tuple(__import__("json").loads(classes_attr))
    # the vandalized copy was a copy: the run on disk is untouched, and its scores are the "after" of the zeroed model
    assert sha256(weights) == digest
    assert row["after"]["mIoU-B"] < row["before"]["mIoU-B"]
    again = run_defense(Identity(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert again["after"] == again["before"]  # a fresh copy, not the vandalized one
    assert again["DER"] == pytest.approx(0.5)


def test_training_set_view_only_when_declared(backdoored_run, fgba_line_path, before):
    spy = Spy(declare=True)
    row = run_defense(spy, backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert row["error"] is None
    train = spy.seen["train"]
    assert {f.name for f in dataclasses.fields(train)} == {"images", "labels"}
    with h5py.File(fgba_line_path, "r") as f:
        images, labels = f["train/images"][()], f["train/labels"][()]
    assert len(train) == len(images)
    np.testing.assert_array_equal(train.images[[5, 2, 2]], images[[5, 2, 2]])
    np.testing.assert_array_equal(train.labels[3:7], labels[3:7])
    np.testing.assert_array_equal(np.asarray(train.images), images)
    view = train.images[0:2]
    with pytest.raises(ValueError):
        view[0, 0, 0, 0] = 1  # read-only
    for secret in SECRETS:
        assert getattr(train, secret, None) is None


def test_context_budget_seed_progress(fgba_line_path):
    calls = []
    ctx = make_context(Identity(), fgba_line_path, device=torch.device("cpu"), seed=7, budget_s=3.0,
                       progress=lambda f, m: calls.append((f, m)))
    assert (ctx.seed, ctx.budget_s, ctx.num_classes) == (7, 3.0, len(ctx.classes))
    ctx.progress(0.25, "x")
    assert calls == [(0.25, "x")]


def test_progress_budget_and_errors_are_recorded(backdoored_run, fgba_line_path, before):
    calls = []
    row = run_defense(Identity(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before,
                      progress=lambda f, m: calls.append((f, m)))
    assert calls == [(0.5, "half way")]
    assert row["verdict"] == {"backdoored": True, "score": 1.5, "suspected": [["*", "wall"]], "status": "backdoored",
                              "coverage": None}
    sleeper = Sleeper()
    row = run_defense(sleeper, backdoored_run, fgba_line_path, device="cpu", budget_s=0.1, panels=0, before=before)
    assert sleeper.budget == 0.1
    assert row["cost"]["over_budget"] is True and row["cost"]["seconds"] >= 0.3
    assert row["after"] is None and row["DER"] is None  # a verdict alone changes no score
    row = run_defense(Crasher(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert row["error"] == "RuntimeError: boom" and row["after"] is None
    assert row["before"]["ASR"] is not None  # the model was still scored


def test_filter_scores_and_rejections(backdoored_run, fgba_line_path, before):
    from sklearn.metrics import roc_auc_score

    from testbed.training.runs import load_run

    row = run_defense(DarkFilter(), backdoored_run, fgba_line_path, device="cpu", panels=2, before=before)
    assert row["error"] is None and row["kinds"] == ["filter"]
    with h5py.File(fgba_line_path, "r") as f:
        benign_idx = f["test_benign/index"][()]
        benign = f["test/images"][()][benign_idx]
        att, target, gt = f["test_attacked/images"][()], f["test_attacked/labels"][()], f["test_attacked/gt"][()]
        clean = f["train/images"][()][f["defense/clean_index"][()]]
    threshold = float(np.quantile(dark_fraction(clean), 0.9))
    s_b, s_a = dark_fraction(benign), dark_fraction(att)
    det = row["detection"]
    assert det["threshold"] == threshold
    assert det["tpr"] == pytest.approx((s_a > threshold).mean())
    assert det["fpr"] == pytest.approx((s_b > threshold).mean())
    assert det["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(len(s_b)), np.ones(len(s_a))], np.r_[s_b, s_a]))
    assert 0 < det["tpr"] < 1  # an imperfect filter: the bookkeeping, not luck, makes the numbers right
    # ASR with rejected inputs counted as defended, by hand: pixels whose target differs from ground truth
    model, _ = load_run(backdoored_run, "cpu")
    with torch.no_grad():
        pred = model(torch.from_numpy(att).permute(0, 3, 1, 2).float() / 255)["out"].argmax(1).numpy()
    valid = (target != gt) & (target != 255) & (gt != 255)
    hit = (pred == target) & valid & ~(s_a > threshold)[:, None, None]
    assert row["after"]["ASR"] == pytest.approx(100.0 * hit.sum() / valid.sum())
    np.testing.assert_array_equal(row["_scores"]["test_benign"][0], benign_idx)
    np.testing.assert_allclose(row["_scores"]["test_attacked"][1], s_a)
    assert row["_panel"]["rejected"].tolist() == (s_a[:2] > threshold).tolist()


def test_flagged_training_samples_are_retrained_without(small_poisoned, monkeypatch):
    import json

    import testbed.evaluation.scoring

    real_train, calls = testbed.evaluation.scoring.train, []

    def spy_train(data_path, out_dir, cfg, **kw):
        calls.append((cfg, kw.get("train_indices")))
        return real_train(data_path, out_dir, cfg, **kw)

    monkeypatch.setattr(testbed.evaluation.scoring, "train", spy_train)  # the trainer the retrain calls
    tiny_run, fgba_line_path = small_poisoned
    row = run_defense(FlagDark(), tiny_run, fgba_line_path, device="cpu", panels=0)
    assert row["error"] is None and row["kinds"] == ["retrain"]
    with h5py.File(fgba_line_path, "r") as f:
        images, poison = f["train/images"][()], f["train/poison_index"][()]
    scores = dark_fraction(images)
    flagged = np.flatnonzero(scores > np.quantile(scores, 0.85))
    tp = np.intersect1d(flagged, poison).size
    fl = row["flagged"]
    assert fl["count"] == len(flagged)
    assert fl["precision"] == pytest.approx(tp / len(flagged))
    assert fl["recall"] == pytest.approx(tp / len(poison))
    assert fl["fraction"] == len(flagged) / len(images)
    assert len(calls) == 2  # without the flagged samples, then the control: without as many drawn at random
    cfg, indices = calls[0]
    np.testing.assert_array_equal(indices, np.setdiff1d(np.arange(len(images)), flagged))
    control = np.sort(np.random.default_rng([0, 0x52414E44]).choice(len(images), size=len(flagged), replace=False))
    np.testing.assert_array_equal(calls[1][1], np.setdiff1d(np.arange(len(images)), control))
    assert set(row["after_random"]) == set(row["after"]) and row["DER_random"] is not None
    original = json.loads((tiny_run / "config.json").read_text())["train"]
    same = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "amp", "channels_last")}
    assert same == {k: v for k, v in original.items() if k not in ("device", "amp", "channels_last")}
    b, a = row["before"], row["after"]
    assert a is not None and row["cost"]["retrain_seconds"] > 0
    expected = (max(0.0, (b["ASR"] - a["ASR"]) / 100) - max(0.0, (b["mIoU-B"] - a["mIoU-B"]) / 100) + 1) / 2
    assert row["DER"] == pytest.approx(expected, abs=1e-12)


def test_pruning_curve_is_scored_on_the_test_sets(backdoored_run, fgba_line_path, before):
    from testbed.training.runs import load_run
    from testbed.scoring.scorer import score_model

    class Pruner:
        name = "pruner"

        def run(self, model, ctx):
            order = list(range(model.classifier.weight.shape[1]))
            return DefenseResult(details={"prune_order": order, "curve": [{"fraction": 0.0, "pruned": 0},
                                                                            {"fraction": 0.5, "pruned": len(order) // 2}]})

    row = run_defense(Pruner(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    curve = row["details"]["curve"]
    assert curve[0]["asr"] == row["before"]["ASR"] and curve[0]["miou_b"] == row["before"]["mIoU-B"]
    model, _ = load_run(backdoored_run, "cpu")
    with torch.no_grad():
        model.classifier.weight[:, : curve[1]["pruned"]] = 0
    expected = score_model(model, fgba_line_path)
    assert curve[1]["asr"] == pytest.approx(expected["ASR"]) and curve[1]["miou_b"] == pytest.approx(expected["mIoU-B"])


def test_builtin_fine_pruning_curve_gets_test_scores(backdoored_run, fgba_line_path, before):
    """The built-in defense hands the runner its prune order, so every curve point carries test ASR/mIoU-B."""
    row = run_defense(load_defense("fine-pruning", step=0.25, epochs=0), backdoored_run, fgba_line_path,
                      device="cpu", panels=0, before=before)
    curve = row["details"]["curve"]
    assert row["error"] is None and len(curve) >= 2
    assert all("asr" in p and "miou_b" in p for p in curve)
    assert curve[0]["asr"] == row["before"]["ASR"]


def test_a_description_that_does_not_fit_the_model_is_noted_not_failed(backdoored_run, fgba_line_path, before):
    class BadPruner:
        name = "bad-pruner"

        def run(self, model, ctx):
            return DefenseResult(details={"prune_order": [0, 10**6], "curve": [{"fraction": 0.0, "pruned": 0},
                                                                                {"fraction": 0.5, "pruned": 2}]})

    row = run_defense(BadPruner(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert row["error"] is None
    assert row["details"]["curve_test_scores"].startswith("not scored: prune_order channel 1000000")
    assert all("asr" not in p and "miou_b" not in p for p in row["details"]["curve"])  # no half-scored curve


def test_failures_are_blamed_on_whoever_failed(backdoored_run, fgba_line_path, before, monkeypatch):
    """The defense's own code (run, input_scores, its model's forward) fails as the defense; retraining as the testbed."""
    import testbed.evaluation.runner as runner

    class RaisingFilter:
        name = "raising-filter"

        def run(self, model, ctx):
            def scores(images):
                raise ValueError("filter broke")
            return DefenseResult(input_scores=scores, threshold=0.5)

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("forward broke")

    class BrokenRepair:
        name = "broken-repair"

        def run(self, model, ctx):
            return DefenseResult(model=Broken())

    cases = ((Crasher(), "RuntimeError: boom"), (RaisingFilter(), "ValueError: filter broke"),
             (BrokenRepair(), "RuntimeError: forward broke"))
    for defense, message in cases:
        row = run_defense(defense, backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
        assert (row["error"], row["error_source"]) == (message, "defense"), defense.name
    ok = run_defense(Identity(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert (ok["error"], ok["error_source"]) == (None, None)

    def broken_retrain(*args, **kwargs):
        raise RuntimeError("retrain broke")

    monkeypatch.setattr(runner, "retrain_without", broken_retrain)
    row = run_defense(FlagDark(), backdoored_run, fgba_line_path, device="cpu", panels=0, before=before)
    assert (row["error"], row["error_source"]) == ("RuntimeError: retrain broke", "testbed")
    assert row["flagged"]["count"] > 0 and row["after"] is None  # what was scored before the failure stays


def test_jsonable_one_rule_for_numbers_json_cannot_hold():
    from testbed.core.jsonutil import jsonable

    got = jsonable({1: np.float32("nan"), "t": (np.int64(2), np.bool_(True)), "x": torch.tensor([1.5, float("inf")]),
                    "a": np.array([[-np.inf, 0.25]]), "o": Path("p")})
    assert got == {"1": None, "t": [2, True], "x": [1.5, None], "a": [[None, 0.25]], "o": "p"}
    assert type(got["t"][0]) is int and type(got["t"][1]) is bool


# -- loading defenses ----------------------------------------------------------------------------------
def test_load_builtins_with_params():
    from testbed import defenses

    for name, cls in defenses.BUILTIN.items():
        d = load_defense(name)
        assert isinstance(d, cls) and d.name == name
    with pytest.raises(UserError, match="has no parameter 'no_such_parameter'; its parameters: n_overlays"):
        load_defense("strip", no_such_parameter=1)
    with pytest.raises(UserError, match="bad parameters"):
        load_defense("strip", n_overlays=0)


def test_unknown_defense_suggests_the_nearest():
    with pytest.raises(UserError) as e:
        load_defense("stirp")
    msg = str(e.value)
    assert "did you mean 'strip'" in msg
    for name in ("fine-pruning", "trigger-synthesis", "strip", "activation-clustering", "spectral-signature"):
        assert name in msg
    assert "\n" not in msg


def test_not_a_defense_is_refused(monkeypatch, tmp_path):
    (tmp_path / "not_a_defense_mod.py").write_text("class NoRun:\n    name = 'x'\n\nclass NoName:\n    def run(self, m, c): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("not_a_defense_mod:NoRun", "not_a_defense_mod:NoName"):
        with pytest.raises(UserError, match="is not a defense"):
            load_defense(spec)
    with pytest.raises(UserError, match="has no"):
        load_defense("not_a_defense_mod:Missing")
    with pytest.raises(UserError, match="cannot import"):
        load_defense("no_such_module_xyz:Thing")


def test_outside_defense_by_module_and_entry_point(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    d = load_defense("median_filter_defense:MedianFilter", size=5)
    assert type(d).__module__ == "median_filter_defense" and d.size == 5
    dist = tmp_path / "median_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: median-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[testbed.defenses]\nmedian-test = median_filter_defense:MedianFilter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_defense("median-test", size=3)
    assert type(d).__name__ == "MedianFilter" and d.size == 3
    with pytest.raises(UserError) as e:
        load_defense("median-tst")
    assert "did you mean 'median-test'" in str(e.value)


def test_example_median_filter_matches_scipy(monkeypatch):
    from scipy.ndimage import median_filter as scipy_median

    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("median_filter_defense", None)
    from median_filter_defense import median_filter

    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    ours = median_filter(x, 3).numpy()
    ref = scipy_median(x.numpy(), size=(1, 1, 3, 3), mode="mirror")  # mirror = torch's reflect padding
    np.testing.assert_allclose(ours, ref)


def test_parse_params():
    assert parse_params(["strip.n=16", "strip.name=abc", "a.b:C.k=[1, 2]"], ["strip", "a.b:C"]) == {
        "strip": {"n": 16, "name": "abc"}, "a.b:C": {"k": [1, 2]}}
    with pytest.raises(UserError, match="not one of"):
        parse_params(["other.n=1"], ["strip"])
    with pytest.raises(UserError, match="DEFENSE.KEY=VALUE"):
        parse_params(["strip"], ["strip"])



# -- one pair loaded once --------------------------------------------------------------------------------
class PruneAndFilter:
    """A repair (one classifier input zeroed), an input filter and a pruning curve: every scoring path at once."""

    name = "prune-and-filter"

    def run(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight[:, :1] = 0
        threshold = float(np.quantile(dark_fraction(ctx.clean_images), 0.9))
        return DefenseResult(model=model, input_scores=dark_fraction, threshold=threshold,
                             details={"prune_order": [0, 1], "curve": [{"fraction": 0.0, "pruned": 0},
                                                                       {"fraction": 0.1, "pruned": 2}]})


@pytest.fixture
def reads(monkeypatch):
    """Counts, per file name, the HDF5 opens (h5py.File), safetensors weight loads and config.json reads."""
    import safetensors.torch

    counts: dict[str, int] = {}

    def note(kind: str, path) -> None:
        key = f"{kind}:{Path(str(path)).name}"
        counts[key] = counts.get(key, 0) + 1

    class CountingFile(h5py.File):
        def __init__(self, name, *args, **kwargs):
            note("h5", name)
            super().__init__(name, *args, **kwargs)

    real_load, real_read = safetensors.torch.load_file, Path.read_text
    monkeypatch.setattr(h5py, "File", CountingFile)
    counting_load = lambda p, *a, **k: (note("weights", p), real_load(p, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(safetensors.torch, "load_file", counting_load)
    monkeypatch.setattr(runs, "load_file", counting_load)  # the name runs imported at its top
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (note("text", self), real_read(self, *a, **k))[1])
    real_bounded = safeload._read_bounded  # JSON files the testbed reads go through its one bounded loader
    monkeypatch.setattr(safeload, "_read_bounded", lambda p: (note("text", p), real_bounded(p))[1])
    return counts


def test_one_pair_reads_weights_once_and_opens_the_data_once(backdoored_run, fgba_line_path, reads):
    from testbed.evaluation.runner import DefenseSettings, load_pair

    settings = DefenseSettings(panels=2, batch_size=16, seed=3)
    with load_pair(backdoored_run, fgba_line_path, "cpu") as run:
        rows = [run_defense(PruneAndFilter(), run, settings), run_defense(Identity(), run, settings)]
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["kinds"] == ["repair", "filter"] and "asr" in rows[0]["details"]["curve"][1]
    data = fgba_line_path.name
    # two defenses on one loaded pair: one weights read, one config read, one open of the data file
    assert reads == {"weights:model.safetensors": 1, "text:config.json": 1, f"h5:{data}": 1}
    reads.clear()
    old = run_defense(PruneAndFilter(), backdoored_run, fgba_line_path, device="cpu", panels=2, batch_size=16, seed=3)
    assert reads == {"weights:model.safetensors": 1, "text:config.json": 1, f"h5:{data}": 1}  # the old call too
    # same numbers either way, and the same as the separate steps computed by hand
    for key in ("before", "after", "DER", "detection", "details"):
        assert old[key] == rows[0][key], key
    assert rows[1]["before"] == rows[0]["before"] and rows[1]["after"] == rows[1]["before"]


def test_the_defense_gets_its_own_model_copy(backdoored_run, fgba_line_path):
    from testbed.evaluation.runner import DefenseSettings, load_pair

    with load_pair(backdoored_run, fgba_line_path, "cpu") as run:
        weights = {k: v.clone() for k, v in run.model.state_dict().items()}
        row = run_defense(PruneAndFilter(), run, DefenseSettings(panels=0))
        assert row["error"] is None
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in weights.items())  # the original untouched
    with pytest.raises(TypeError, match="unexpected keyword"):
        with load_pair(backdoored_run, fgba_line_path, "cpu") as run:
            run_defense(Identity(), run, DefenseSettings(), seed=1)
