"""Detection defenses made faithful to their papers (Neural Cleanse, STRIP, activation clustering) and two new
ones (ABL, SCALE-UP): hand-computed values on hand-built models, then the protocol on the tiny backdoored model."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

from testbed import defenses
from testbed.defense import DefenseContext, ReadOnlyArray, TrainingSet
from testbed.defenses.abl import ABL, image_losses, lga_loss, reinitialise
from testbed.defenses.activation_clustering import ActivationClustering, cluster_flags
from testbed.defenses.scale_up import ScaleUp, spc
from testbed.defenses.strip import Strip, clean_threshold
from testbed.defenses.trigger_synthesis import TriggerSynthesis, flag_small
from testbed.stats.intervals import auroc, auroc_interval
from test_defenses import _RedModel  # logits (s·red, 0): entropy known in closed form


def _strict_json(res):
    json.dumps(res.details, allow_nan=False)


# -- Neural Cleanse: unconverged candidates never enter the MAD -------------------------------------------
class _TwoReachable(nn.Module):
    """K = 6 classes, per pixel: classes 0 and 1 follow the red and green channels; classes 2..5 sit at −50, so
    no trigger can make a pixel predict them.  A benign model (no backdoor) whose candidates 2..5 cannot converge."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        r, g = x[:, :1], x[:, 1:2]
        rest = torch.full_like(r, -50.0).expand(-1, 4, -1, -1)
        return {"out": torch.cat([8 * (r - g), 8 * (g - r), rest], 1)}


def _nc_ctx(n=6, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return DefenseContext(images, np.zeros((n, size, size), np.uint8), tuple("abcdef"), torch.device("cpu"), seed=seed,
                          image_size=(size, size))


def test_unconverged_candidates_do_not_make_a_benign_model_backdoored():
    ctx = _nc_ctx()
    res = TriggerSynthesis(steps=40, batch_size=6, patience=2, early_stop_patience=3).run(_TwoReachable(), ctx)
    _strict_json(res)
    d = res.details
    # candidates 2..5 never reach the success threshold: listed apart, kept out of the MAD
    assert set(d["unconverged"]) == {"*->c", "*->d", "*->e", "*->f"}
    assert all(not d["reached"][lab] for lab in d["unconverged"]) and set(d["norms"]) <= {"*->a", "*->b"}
    assert d["converged"] == len(d["norms"]) < 3
    assert res.verdict.status == "inconclusive" and not res.verdict.backdoored and res.verdict.suspected == []
    # the case is real: had the unconverged candidates' last norms entered the MAD, a converged one would be flagged
    all_norms = list(d["norms"].values()) + [v["last_norm"] for v in d["unconverged"].values()]
    assert flag_small(all_norms).any()


def test_success_is_the_share_of_images_whose_attacked_pixels_all_reach_the_target():
    """A model that predicts class 0 wherever red > green: the mask-free candidate '*->a' succeeds on exactly the
    images where every pixel already has red > green, which the test counts itself."""
    from testbed.defenses._trigger_search import EpochPlan, ScheduleConfig, _Slots, _step

    class RedWins(_TwoReachable):
        pass

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((5, 3, 4, 4))).float()
    x[:2, 0], x[:2, 1] = 0.9, 0.1  # images 0, 1: every pixel red > green
    pred = RedWins()(x)["out"].argmax(1)
    slots = _Slots(ScheduleConfig(), 4, 4, torch.device("cpu"))
    slots.add(0, (-1, 0), seed=0)
    slots.mask_p.fill_(-30.0)  # sigmoid(-30) ≈ 0: the trigger changes nothing
    attacked, counted, _, _ = _step(RedWins(), slots, x, pred, torch.arange(5)[None], 0.0, 1.0)
    every = (x[:, 0] > x[:, 1]).flatten(1).all(1).sum().item()
    assert every >= 2 and attacked.tolist() == [every] and counted.tolist() == [5]
    assert EpochPlan(12, 5).mini_batches == 3 and EpochPlan(12, 5, per_epoch=False).mini_batches == 1


def test_nc_counts_epochs_over_the_clean_subset():
    ctx = _nc_ctx(n=6)
    res = TriggerSynthesis(steps=3, batch_size=4, early_stop=False, max_candidates=2).run(_TwoReachable(), ctx)
    # 3 epochs × 6 images × (forward + backward) per candidate, whatever the mini-batch size
    assert res.details["cost"]["passes_per_candidate"] == 3 * 6 * 2
    assert all(s == 3 for s in res.details["steps"].values()) and res.details["cost"]["step_unit"].startswith("epoch")
    fast = TriggerSynthesis(schedule="fast", steps=3, batch_size=4, early_stop=False, max_candidates=2).run(_TwoReachable(), ctx)
    assert fast.details["cost"]["passes_per_candidate"] == 3 * 4 * 2
    assert TriggerSynthesis().max_steps() == 1000 and TriggerSynthesis(schedule="fast").max_steps() == 300


# -- STRIP: STRIP's additive superimposition, N = 100, the paper's threshold ------------------------------------
def test_strip_defaults_are_the_papers_and_add_is_a_saturating_sum():
    strip = Strip()
    assert (strip.n_overlays, strip.mode, strip.frr, strip.threshold_rule) == (100, "add", 0.01, "normal")
    c, s = 0.6, 8.0  # overlay red 153/255: red + overlay saturates at 1 for bright inputs
    pool = np.full((5, 4, 4, 3), round(c * 255), np.uint8)
    ctx = DefenseContext(pool, np.zeros((5, 4, 4), np.uint8), ("a", "b"), torch.device("cpu"), seed=3, image_size=(4, 4))
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    got = Strip(n_overlays=4, fraction=0.25).scorer(_RedModel(s), ctx)(images)
    for i in range(3):
        summed = np.minimum(255, images[i, :, :, 0].astype(np.int64) + round(c * 255)) / 255  # cv2.addWeighted(1, 1)
        p = 1 / (1 + np.exp(-s * summed))
        ent = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        assert got[i] == pytest.approx(-np.sort(ent.ravel())[:4].mean(), rel=1e-4)


def test_strip_threshold_is_a_normal_fit_at_the_frr():
    scores = np.array([-1.0, -0.5, -0.2, 0.1, 0.3, 0.9])
    mu, sd = scores.mean(), math.sqrt(((scores - scores.mean()) ** 2).sum() / 5)
    assert clean_threshold(scores, 0.01) == pytest.approx(mu + NormalDist().inv_cdf(0.99) * sd)
    assert clean_threshold(scores, 0.2, "quantile") == pytest.approx(np.quantile(scores, 0.8))


def test_strip_says_when_the_clean_subset_is_smaller_than_n(fgba_line_path):
    from testbed.data.h5data import open_dataset

    with open_dataset(fgba_line_path) as f:
        ci = np.asarray(f["defense/clean_index"], np.int64)[:5]
        images, labels = f.read("train/images", ci), f.read("train/labels", ci)
    ctx = DefenseContext(images, labels, tuple("ab"), torch.device("cpu"), seed=0, image_size=images.shape[1:3])
    res = Strip(n_overlays=8).run(_RedModel(), ctx)
    d = res.details
    assert d["overlays_repeat"] and d["threshold_scores"] == 5 and "5 clean scores" in d["note"]
    assert not Strip(n_overlays=4).run(_RedModel(), ctx).details["overlays_repeat"]


# -- activation clustering: FastICA (Chen et al.) by default --------------------------------------------------
@pytest.mark.parametrize("reduce", ["ica", "pca"])
def test_activation_clustering_flags_a_planted_cluster_with_either_reduction(reduce):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (120, 32)), rng.normal(0, 1, (20, 32)) + 6.0 * np.eye(32)[0]])
    flags, sizes = cluster_flags(x, 10, 0.35, seed=0, reduce=reduce)
    assert flags[120:].all() and flags.sum() == min(sizes) and flags[120:].sum() / flags.sum() >= 0.9  # recall 1, precision ≥ 0.9
    assert ActivationClustering().reduce == "pca" and ActivationClustering(reduce="ica").reduce == "ica"
    with pytest.raises(ValueError, match="reduce"):
        ActivationClustering(reduce="tsne").check_params()


# -- ABL and SCALE-UP: their arithmetic by hand ---------------------------------------------------------------
def test_abl_losses_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # 1 image, 2 classes, 1×2 pixels
    labels = torch.tensor([[[0, 255]]])  # the second pixel is ignored
    want = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert image_losses(logits, labels).item() == pytest.approx(want, rel=1e-6)
    losses = torch.tensor([0.2, 0.5, 1.5])
    assert lga_loss(losses, 0.5).item() == pytest.approx((-0.2 + 0.0 + 1.5) / 3)


def test_scale_up_spc_by_hand():
    x = torch.tensor([[[[0.05, 0.2]], [[0.1, 0.05]], [[0.0, 0.0]]]])  # 1 image 1×2: pixel 0 green > red, pixel 1 red > green
    model = _TwoReachable()
    # ×3: red (0.15, 0.6), green (0.3, 0.15); ×11: red (0.55, 1), green (1, 0.55): both pixels keep their class
    assert spc(model, x, (3, 11)).item() == pytest.approx(1.0)
    x2 = torch.tensor([[[[0.2]], [[0.1]], [[0.0]]]])  # red 0.2 > green 0.1; ×5: (1, 0.5); ×11: (1, 1) → a tie → class 0
    assert spc(model, x2, (5, 11)).item() == pytest.approx(1.0)
    x3 = torch.tensor([[[[0.1]], [[0.2]], [[0.0]]]])  # green wins; ×11 both clip to 1: the tie goes to class 0
    assert spc(model, x3, (3, 11)).item() == pytest.approx(0.5)


# -- on the tiny backdoored model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(fgba_line_path):
    from testbed.data.h5data import open_dataset

    with open_dataset(fgba_line_path) as f:
        n = f.length("train")
        return {"clean_index": np.asarray(f["defense/clean_index"], np.int64),
                "images": f.read("train/images", np.arange(n)), "labels": f.read("train/labels", np.arange(n)),
                "poison": np.asarray(f["train/poison_index"], np.int64), "classes": tuple(f.classes),
                "test": np.asarray(f.file["test/images"]), "attacked": np.asarray(f.file["test_attacked/images"])}


@pytest.fixture(scope="module")
def model(backdoored_run):
    from testbed.training.runs import load_run

    return load_run(backdoored_run)[0]


def _ctx(p, train=None, budget_passes=None, seed=0):
    ts = None
    if train is not None:
        imgs, labs = p["images"][train], p["labels"][train]
        ts = TrainingSet(ReadOnlyArray(lambda i: imgs[i], imgs.shape, imgs.dtype),
                         ReadOnlyArray(lambda i: labs[i], labs.shape, labs.dtype))
    ci = p["clean_index"]
    return DefenseContext(p["images"][ci], p["labels"][ci], p["classes"], torch.device("cpu"), seed=seed, train=ts,
                          image_size=p["images"].shape[1:3], budget_passes=budget_passes)


def test_abl_isolates_the_lowest_loss_images_within_its_pass_budget(model, poisoned):
    """ABL on the tiny poisoned set of the fixtures (240 images, 10% poisoned; two isolation epochs from scratch,
    the paper: 20): the isolated images are the paper's 1% with the lowest loss under the LGA-trained isolation
    model (``losses_``), and the passes are the epochs' plus one loss pass.  What is NOT asserted: that they are
    poisoned.  Measured over epochs 2/5/10 × defense seeds 0-2 (`docs/make_abl_fixture.py`, docs/defenses.md), the
    isolated 3 held 0 poisoned images on seven runs of nine and the loss ranking's AUROC ranged 0.25-0.98: on this
    fixture ABL's isolation is a seed and CPU lottery (the earlier precision test passed on an Intel Xeon and
    failed on an AMD EPYC), so issue 22's precision item is a finding here, not a test."""
    train = np.arange(len(poisoned["images"]))
    abl = ABL(epochs=2)
    res = abl.run(model, _ctx(poisoned, train))
    _strict_json(res)
    fl, losses = res.flagged_train, abl.losses_
    assert fl.dtype == np.int64 and len(fl) == math.ceil(0.01 * len(train)) and res.model is None
    assert losses.shape == (len(train),) and np.isfinite(losses).all()
    assert losses[fl].max() <= np.delete(losses, fl).min()  # the lowest
    assert res.details["isolated_losses"] == pytest.approx(losses[fl].tolist())
    assert res.details["median_loss"] == pytest.approx(float(np.median(losses)))
    assert res.cost.forward_passes == 2 * len(train) + len(train) and res.cost.backward_passes == 2 * len(train)
    with pytest.raises(ValueError, match="training set"):
        abl.run(model, _ctx(poisoned))


def test_abl_unlearn_returns_a_repaired_model_and_honours_a_pass_budget(model, poisoned):
    train = np.arange(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ABL(epochs=1, init="model", unlearn=True, unlearn_epochs=1).run(model, _ctx(poisoned, train))
    for k, v in model.state_dict().items():  # the suspicious model is left alone
        assert torch.equal(v, before[k]), k
    assert isinstance(res.model, nn.Module) and sorted(res.kinds()) == ["repair", "retrain"]
    assert res.details["unlearn_epochs_done"] == 1 and res.details["note"]
    again = ABL(epochs=1, init="model", unlearn=True, unlearn_epochs=1).run(model, _ctx(poisoned, train))  # same seed
    np.testing.assert_array_equal(again.flagged_train, res.flagged_train)
    for (k1, v1), (k2, v2) in zip(res.model.state_dict().items(), again.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    budget = 2 * 16 + 32 + 5  # one training batch of 16, the loss pass; the second batch would pass the budget
    spent = ABL(epochs=3).run(model, _ctx(poisoned, train, budget_passes=budget))
    assert spent.details["stopped_by"] == "passes" and spent.details["epochs_done"] == 0
    assert spent.cost.forward_passes + spent.cost.backward_passes == 2 * 16 + 32 <= budget
    fresh = reinitialise(model, 0)
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(reinitialise(model, 0).classifier.weight, fresh.classifier.weight)


def test_scale_up_auroc_on_the_line_trigger_model(model, poisoned):
    res = ScaleUp().run(model, _ctx(poisoned))
    _strict_json(res)
    benign, attacked = res.input_scores(poisoned["test"]), res.input_scores(poisoned["attacked"])
    y = np.r_[np.zeros(len(benign)), np.ones(len(attacked))]
    s = np.r_[benign, attacked]
    value, (lo, hi) = auroc(y, s), auroc_interval(y, s, seed=0)
    assert value > 0.5 + (hi - lo) / 2 and lo > 0.5, (value, lo, hi)
    clean = np.array(res.details["clean_scores"])
    assert res.threshold == pytest.approx(np.quantile(clean, 0.95)) and np.all((clean >= 0) & (clean <= 1))
    np.testing.assert_array_equal(ScaleUp().run(model, _ctx(poisoned)).input_scores(poisoned["test"][:4]), benign[:4])
    assert res.cost.forward_passes == 6 * len(clean)


def test_scale_up_honours_a_pass_budget_and_runs_on_a_benign_model(model, poisoned):
    res = ScaleUp(batch_size=12).run(model, _ctx(poisoned, budget_passes=30))  # 2 images × 6 forwards per chunk
    assert res.details["stopped_by"] == "passes" and res.details["clean_images_scored"] == 4
    assert res.cost.forward_passes == 24 <= 30
    from testbed import models

    benign = models.create("deeplabv3_tiny", len(poisoned["classes"]))  # an untrained model: no crash, finite scores
    for defense in (ScaleUp(), Strip(n_overlays=4)):
        out = defense.run(benign, _ctx(poisoned))
        assert math.isfinite(out.threshold) and np.isfinite(out.input_scores(poisoned["test"][:3])).all()


def test_registry_lists_the_new_defenses():
    assert {"abl", "scale-up"} <= set(defenses.BUILTIN)
    assert defenses.BUILTIN["abl"].uses_training_set and not defenses.BUILTIN["scale-up"].uses_training_set
    for name in ("abl", "scale-up"):
        cls = defenses.BUILTIN[name]
        assert set(cls.params_doc) == set(list(__import__("inspect").signature(cls.__init__).parameters)[1:])
