"""The five built-in defenses: unit checks against hand-computed values, then end to end on a backdoored model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from testbed import defenses
from testbed.defenses import _features
from testbed.defenses.activation_clustering import cluster_flags
from testbed.defenses.spectral_signature import spectral_scores, top_flags
from testbed.defenses.strip import Strip, image_score, pixel_entropy
from testbed.defenses.trigger_synthesis import anomaly_index, candidate_counts, flag_small
from testbed.defense import Defense, DefenseContext, ReadOnlyArray, TrainingSet


# -- registry ----------------------------------------------------------------------------------------
def test_builtin_registry_names_and_protocol():
    assert set(defenses.BUILTIN) == {"fine-pruning", "trigger-synthesis", "strip", "activation-clustering", "spectral-signature",
                                     "ft", "nad", "anp", "clp", "i-bau", "abl", "scale-up"}
    for name, cls in defenses.BUILTIN.items():
        obj = cls()
        assert obj.name == name
        assert isinstance(obj, Defense)
        assert getattr(obj, "uses_training_set", False) == (name in ("activation-clustering", "spectral-signature", "abl"))


# -- trigger synthesis: counts, projections, MAD ------------------------------------------------------
@pytest.mark.parametrize("k", [4, 8, 150])
@pytest.mark.parametrize("hw", [(64, 64), (512, 512)])
def test_candidate_counts_exact(k, hw):
    h, w = hw
    c = candidate_counts(k, h, w)
    assert c["image"] == k
    assert c["pairs"] == k * (k - 1)
    assert c["log10_maps"] == pytest.approx(h * w * math.log10(k), rel=1e-12)
    # the log10 count is the exponent of K^(H·W): check against exact integer arithmetic for a small case
    if k == 4 and h == 64:
        assert c["log10_maps"] == pytest.approx(len(str(4 ** (64 * 64))) - 1, abs=1.0)


def test_mad_anomaly_index_by_hand():
    norms = [10, 10, 11, 9, 2]
    # median 10; |dev| = 0,0,1,1,8; MAD = median(0,0,1,1,8) = 1; index = dev / 1.4826
    expected = np.array([0, 0, 1, 1, 8]) / 1.4826
    np.testing.assert_allclose(anomaly_index(norms), expected, rtol=1e-12)
    assert flag_small(norms).tolist() == [False, False, False, False, True]
    # a large norm is anomalous too, but only small norms are flagged (a backdoor needs a small trigger)
    assert flag_small([10, 10, 11, 9, 30]).tolist() == [False] * 5


# -- STRIP: entropy and score --------------------------------------------------------------------------
def test_strip_entropy_and_score_by_hand():
    # 1 image, 2 classes, 1×4 pixels: logits (0,0) → p=(.5,.5); (a,0) → p=(σ(a), 1−σ(a))
    a = [0.0, 1.0, 3.0, 10.0]
    logits = torch.tensor([[[a], [[0.0] * 4]]]).reshape(1, 2, 1, 4)

    def h(x):
        p = 1 / (1 + math.exp(-x))
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    ent = pixel_entropy(logits)
    np.testing.assert_allclose(ent[0, 0].numpy(), [h(x) for x in a], rtol=1e-5, atol=1e-7)  # float32
    assert ent[0, 0, 0].item() == pytest.approx(math.log(2), rel=1e-6)
    # lowest 50% of 4 pixels = the two most confident ones (a = 3, 10), negated mean
    assert image_score(ent, 0.5).item() == pytest.approx(-(h(3.0) + h(10.0)) / 2, rel=1e-5)
    # 10% of 4 pixels rounds up to one pixel
    assert image_score(ent, 0.1).item() == pytest.approx(-h(10.0), rel=1e-4)


class _RedModel(nn.Module):
    """logits = (s·red, 0) per pixel: its entropy is known in closed form for any blended input."""

    def __init__(self, s: float = 8.0):
        super().__init__()
        self.s = s
        self.classifier = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        red = x[:, :1]
        return {"out": torch.cat([self.s * red, torch.zeros_like(red)], 1)}


def test_strip_scorer_batched_matches_hand_computation():
    # all clean overlays are the same constant image, so every overlay draw gives the same blend
    c, s, n = 0.2, 8.0, 4
    pool = np.full((5, 4, 4, 3), round(c * 255), np.uint8)
    ctx = DefenseContext(pool, np.zeros((5, 4, 4), np.uint8), ("a", "b"), torch.device("cpu"), seed=3, image_size=(4, 4))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    strip = Strip(n_overlays=n, fraction=0.25, batch_size=8, mode="blend")  # 2 images per forward: several chunks
    scorer = strip.scorer(_RedModel(s), ctx)
    got = scorer(images)

    cval = round(c * 255) / 255
    for i in range(len(images)):
        red = images[i, :, :, 0].astype(np.float64) / 255
        z = s * (0.5 * red + 0.5 * cval)
        p = 1 / (1 + np.exp(-z))
        ent = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        low = np.sort(ent.ravel())[:4]  # 25% of 16 pixels
        assert got[i] == pytest.approx(-low.mean(), rel=1e-4)
    # an image's score does not depend on the batch it comes in
    np.testing.assert_allclose(scorer(images[3:4]), got[3:4], rtol=1e-6)
    assert scorer.forward == (len(images) + 1) * n


# -- AC / SS on planted feature sets ---------------------------------------------------------------------
def test_activation_clustering_flags_planted_cluster():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (120, 32))
    planted = rng.normal(0, 1, (20, 32)) + 6.0 * np.eye(32)[0]
    x = np.concatenate([clean, planted])
    flags, sizes = cluster_flags(x, n_components=10, size_threshold=0.35, seed=0)
    assert flags.tolist() == [False] * 120 + [True] * 20
    assert sorted(sizes) == [20, 120]
    # a class with no planted cluster: two halves of one blob, no cluster below 35%
    flags2, _ = cluster_flags(rng.normal(0, 1, (100, 32)), seed=0)
    assert not flags2.any()


def test_spectral_signature_flags_planted_outliers():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=64)
    direction /= np.linalg.norm(direction)
    clean = rng.normal(0, 1, (180, 64))
    planted = rng.normal(0, 1, (20, 64)) + 8.0 * direction
    x = np.concatenate([clean, planted])
    scores = spectral_scores(x)
    # independent: top eigenvector of the covariance, squared projection of the centred data
    xc = x - x.mean(0)
    _, vecs = np.linalg.eigh(xc.T @ xc)
    np.testing.assert_allclose(scores, (xc @ vecs[:, -1]) ** 2, rtol=1e-6)
    flags = top_flags(scores, 1.5 * 0.1)
    assert flags.sum() == 30
    assert flags[180:].all()  # every planted outlier is among the removed 1.5ε


def test_pooled_class_features_and_flag_rules_by_hand():
    feats = torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 255, 255], [0, 0, 255, 255]]])
    v, img, cls, area = _features.pooled_class_features(feats, labels, 3)
    # class 0 covers feature cells (0,0),(1,0); class 1 covers cell (0,1); 255 is ignored
    assert cls.tolist() == [0, 1] and img.tolist() == [0, 0] and area.tolist() == [8.0, 4.0]
    np.testing.assert_allclose(v[0].numpy(), [(0 + 2) / 2, (4 + 6) / 2])
    np.testing.assert_allclose(v[1].numpy(), [1.0, 5.0])
    image = np.array([0, 0, 1, 1, 2])
    area = np.array([90.0, 10.0, 30.0, 70.0, 5.0])
    flagged = np.array([False, True, False, True, False])
    assert _features.flag_images(image, area, flagged, "any").tolist() == [0, 1]
    assert _features.flag_images(image, area, flagged, "area").tolist() == [1]


def _planted_regions(seed=0, n=400, poisoned=40, k=6, dim=32, hw=4096):
    """Per-(image, class) vectors shaped like FGBA N-to-1 on scenes: the first ``poisoned`` images are one
    full-image 'c0' region pushed along a trigger direction; clean images hold 2–5 regions of random classes
    and areas; a quarter of class c1's regions form a natural sub-mode (a split below 35% that is not poison)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, (k, dim))
    sub, trig = rng.normal(0, 1, dim), rng.normal(0, 1, dim)
    sub, trig = 5 * sub / np.linalg.norm(sub), 8 * trig / np.linalg.norm(trig)
    vec, img, cls, area = [], [], [], []
    for i in range(n):
        if i < poisoned:
            vec.append(mu[0] + trig + rng.normal(0, 1, dim)), img.append(i), cls.append(0), area.append(hw)
            continue
        m = rng.integers(2, 6)
        for c, a in zip(rng.choice(k, m, replace=False), rng.dirichlet(np.ones(m)) * hw):
            v = mu[c] + rng.normal(0, 1, dim) + (sub if c == 1 and rng.random() < 0.25 else 0)
            vec.append(v), img.append(i), cls.append(c), area.append(a)
    feats = {"vectors": np.array(vec, np.float32), "image": np.array(img), "cls": np.array(cls),
             "area": np.array(area), "images_seen": n, "stopped_by_budget": False}
    ctx = SimpleNamespace(num_classes=k, classes=tuple(f"c{j}" for j in range(k)), progress=lambda f, m: None,
                          train=range(n))
    return feats, ctx


def test_spectral_signature_removes_about_its_nominal_share_of_images():
    """Tran et al. remove 1.5ε of each class; per image that must stay near 1.5ε of the training images."""
    feats, ctx = _planted_regions()
    analyse = lambda v: (top_flags(spectral_scores(v), 0.15), {})  # noqa: E731
    drop, d = _features.flag_per_class(feats, ctx, 10, analyse, "scored", "area", "labels", nominal=0.15)
    assert d["nominal_fraction"] == 0.15 and d["removed_fraction"] == len(drop) / 400
    assert 0.5 * 0.15 <= d["removed_fraction"] <= 1.5 * 0.15, d["removed_fraction"]
    assert np.isin(np.arange(40), drop).mean() >= 0.8  # and the planted poison is among them
    # the old default ("any" region flagged drops the image) removes several times the nominal share
    _, old = _features.flag_per_class(feats, ctx, 10, analyse, "scored", "any", "labels", nominal=0.15)
    assert old["removed_fraction"] > 1.5 * 0.15


def test_activation_clustering_removes_about_its_nominal_share_of_images():
    """Chen et al. remove the clusters judged poisoned; nominal = their share of the labelled pixels."""
    feats, ctx = _planted_regions()
    analyse = lambda v: (cluster_flags(v, 10, 0.35, 0)[0], {})  # noqa: E731
    drop, d = _features.flag_per_class(feats, ctx, 10, analyse, "clustered", "area", "labels")
    flagged_area = 0.0  # independent: cluster each class again, sum the areas of the small clusters' members
    for c in range(ctx.num_classes):
        sel = np.flatnonzero(feats["cls"] == c)
        flagged_area += feats["area"][sel][cluster_flags(feats["vectors"][sel], 10, 0.35, 0)[0]].sum()
    nominal = flagged_area / feats["area"].sum()
    assert d["nominal_fraction"] == pytest.approx(nominal) and 0.1 < nominal < 0.2
    assert 0.5 * nominal <= d["removed_fraction"] <= 1.5 * nominal, (d["removed_fraction"], nominal)
    assert np.isin(np.arange(40), drop).all()
    _, old = _features.flag_per_class(feats, ctx, 10, analyse, "clustered", "any", "labels")
    assert old["removed_fraction"] > 1.5 * nominal  # sub-mode regions drag whole images out with "any"


class _PlantedFeatures(nn.Module):
    """Classifier-input features fixed per image (the image index is encoded in pixel (0,0) of channel 0)."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.feats = feats
        self.classifier = nn.Conv2d(feats.shape[1], 2, 1)

    def forward(self, x):
        idx = (x[:, 0, 0, 0] * 255).round().long()
        return {"out": self.classifier(self.feats[idx])}


def test_fine_pruning_rankings_differ_on_a_channel_firing_in_few_rows():
    from testbed.defenses.fine_pruning import channel_activation

    f = torch.zeros(2, 3, 8, 8)
    f[0, 0, 0:2] = 10.0  # channel 0: strong, in two rows of image 0 ...
    f[1, 0, 3] = 6.0  # ... and one row of image 1
    f[:, 1] = 3.0  # channel 1: moderate everywhere
    f[:, 2] = 1.0  # channel 2: weak everywhere, one brighter pixel
    f[:, 2, 5, 5] = 2.5
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1, 0, 0, 0] = 1
    model = _PlantedFeatures(f).eval()
    mean = channel_activation(model, images, torch.device("cpu"), batch_size=1, ranking="mean")
    top = channel_activation(model, images, torch.device("cpu"), batch_size=1, ranking="max")
    # by hand: means over 2 images × 64 positions; max per image, then the mean over images
    np.testing.assert_allclose(mean, [(10 * 16 + 6 * 8) / 128, 3.0, (64 + 1.5) / 64], rtol=1e-12)
    np.testing.assert_allclose(top, [(10 + 6) / 2, 3.0, 2.5], rtol=1e-12)
    assert np.argsort(mean, kind="stable").tolist() == [2, 0, 1]  # mean: the few-rows channel is pruned second
    assert np.argsort(top, kind="stable").tolist() == [2, 1, 0]  # max: it is pruned last
    with pytest.raises(ValueError, match="ranking"):
        defenses.BUILTIN["fine-pruning"](ranking="median").check_params()


# -- end to end on a real backdoored model --------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(fgba_line_path):
    from testbed.data.h5data import open_dataset

    with open_dataset(fgba_line_path) as f:
        n = f.length("train")
        images, labels = f.read("train/images", np.arange(n)), f.read("train/labels", np.arange(n))
        return {"clean_index": np.asarray(f["defense/clean_index"], np.int64), "images": images, "labels": labels,
                "poison": np.asarray(f["train/poison_index"], np.int64), "classes": tuple(f.classes)}


@pytest.fixture(scope="module")
def model(backdoored_run):
    from testbed.training.runs import load_run

    return load_run(backdoored_run)[0]


def _ctx(p, seed=0, train=False, budget_s=None, progress=None, budget_passes=None):
    imgs, labs = p["images"], p["labels"]
    ts = None
    if train:
        ts = TrainingSet(ReadOnlyArray(lambda i: imgs[i], imgs.shape, imgs.dtype), ReadOnlyArray(lambda i: labs[i], labs.shape, labs.dtype))
    ci = p["clean_index"]
    return DefenseContext(imgs[ci], labs[ci], p["classes"], torch.device("cpu"), seed=seed, budget_s=budget_s, train=ts,
                          image_size=imgs.shape[1:3], progress=progress or (lambda f, m: None), budget_passes=budget_passes)


def _strict_json(res):
    """details must be JSON-able without NaN/inf (the runner writes them into results.json)."""
    json.dumps(res.details, allow_nan=False)


def _miou_numpy(pred, label, k):
    keep = label != 255
    cm = np.bincount(label[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_fine_pruning_end_to_end(model, poisoned):
    calls = []
    ctx = _ctx(poisoned, progress=lambda f, m: calls.append(f))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = defenses.BUILTIN["fine-pruning"](step=0.1, max_fraction=0.3, epochs=1).run(model, ctx)
    for k, v in model.state_dict().items():  # the input model is left alone
        assert torch.equal(v, before[k]), k
    _strict_json(res)
    curve = res.details["curve"]
    fr = [p["fraction"] for p in curve]
    assert fr[0] == 0 and all(a < b for a, b in zip(fr, fr[1:]))
    assert calls and all(0 <= f <= 1 for f in calls)

    # independent recomputation of one pruned point: channel means by hook, prune, numpy mIoU
    point = curve[1]
    feats = []
    h = model.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    x = torch.from_numpy(np.array(ctx.clean_images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    order = np.argsort(feats[0].double().mean((0, 2, 3)).numpy(), kind="stable")
    m2 = copy.deepcopy(model)  # work on a copy: the module-scoped model stays untouched
    with torch.no_grad():
        m2.classifier.weight[:, torch.from_numpy(order[: point["pruned"]])] = 0
        pred = m2(x)["out"].argmax(1).numpy()
    assert point["miou_clean"] == pytest.approx(_miou_numpy(pred, np.array(ctx.clean_labels), ctx.num_classes), abs=1e-9)

    # the repaired model keeps the accepted channels cut, and accepted points respect the 10% floor
    w = res.model.classifier.weight.detach()
    assert torch.all(w[:, res.details["pruned_channels"]] == 0)
    assert all(p["miou_clean"] >= 0.9 * curve[0]["miou_clean"] for p in curve if p["accepted"])
    assert res.cost.forward_passes > 0 and res.cost.backward_passes == len(ctx.clean_images)

    again = defenses.BUILTIN["fine-pruning"](step=0.1, max_fraction=0.3, epochs=1).run(model, ctx)  # same seed ⇒ same model
    assert again.details["curve"] == curve
    for (k1, v1), (k2, v2) in zip(res.model.state_dict().items(), again.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_trigger_synthesis_end_to_end_and_budget(model, poisoned):
    ctx = _ctx(poisoned)
    ts = defenses.BUILTIN["trigger-synthesis"](targets="image", steps=2, batch_size=4, max_candidates=3)
    res = ts.run(model, ctx)
    _strict_json(res)
    cost = res.details["cost"]
    k, (h, w) = len(poisoned["classes"]), poisoned["images"].shape[1:3]
    assert cost["candidates_run"] == 3 and cost["candidates_in_mode"] == k
    assert cost["counts"]["pairs"] == k * (k - 1) and cost["counts"]["log10_maps"] == pytest.approx(h * w * math.log10(k))
    # NC's units: 2 epochs × 12 clean images × (forward + backward): too few to stop early
    assert cost["passes_per_candidate"] == 2 * 12 * 2
    assert cost["seconds_per_pass"] == pytest.approx(cost["loop_seconds"] / (3 * 48))
    assert cost["projected"]["image_seconds"] == pytest.approx(48 * k * cost["seconds_per_pass"])
    ade = cost["projected_ade20k"]["pairs_seconds"]
    assert ade == pytest.approx(48 * cost["seconds_per_pass"] * (512 * 512) / (h * w) * 150 * 149)
    assert len(res.details["reached"]) == 3 and res.verdict is not None
    assert len(res.details["norms"]) + len(res.details["unconverged"]) == 3
    assert res.verdict.coverage == pytest.approx(3 / k) and res.verdict.status in ("inconclusive", "backdoored")
    idx = anomaly_index(list(res.details["norms"].values())) if res.details["norms"] else []  # converged ones only
    np.testing.assert_allclose(list(res.details["anomaly_index"].values()), idx)
    assert res.cost.backward_passes >= 3 * 2 * 4
    assert all(len(c) == 2 for c in res.details["mask_norm_curves"].values())

    again = ts.run(model, ctx)  # same seed ⇒ identical norms and verdict
    assert again.details["norms"] == res.details["norms"] and again.verdict == res.verdict

    pairs = defenses.BUILTIN["trigger-synthesis"](targets="pairs", steps=1, batch_size=2, max_candidates=2).run(model, ctx)
    labels = list(pairs.details["reached"])
    assert len(labels) == 2 and all("->" in lab and not lab.startswith("*") for lab in labels)
    assert all(src != dst for src, dst in (lab.split("->") for lab in labels))
    assert pairs.details["cost"]["coverage_of_pairs"] == pytest.approx(2 / (k * (k - 1)))

    spent = defenses.BUILTIN["trigger-synthesis"](targets="pairs", steps=2, batch_size=4).run(model, _ctx(poisoned, budget_s=0.0))
    _strict_json(spent)
    c = spent.details["cost"]
    assert c["stopped_by_budget"] and c["stopped_by"] == "seconds" and c["candidates_run"] == 0
    assert spent.verdict.status == "inconclusive" and spent.verdict.coverage == 0.0
    assert c["candidates_in_mode"] + c["candidates_skipped_no_source"] == k * (k - 1)


def test_strip_end_to_end(model, poisoned):
    ctx = _ctx(poisoned)
    strip = defenses.BUILTIN["strip"](n_overlays=4)
    res = strip.run(model, ctx)
    _strict_json(res)
    clean = np.array(res.details["clean_scores"])
    assert len(clean) == len(ctx.clean_images) and np.isfinite(clean).all()
    # Gao et al.'s threshold: a normal fitted to the clean scores, cut at the 1% false rejection rate
    assert res.threshold == pytest.approx(clean.mean() + 2.3263478740408408 * clean.std(ddof=1))
    assert res.details["frr"] == pytest.approx(np.mean(clean > res.threshold))
    test = poisoned["images"][:6]
    s1 = res.input_scores(test)
    assert s1.shape == (6,) and s1.dtype == np.float64
    assert res.cost.forward_passes == 4 * len(ctx.clean_images)
    again = strip.run(model, ctx)
    np.testing.assert_array_equal(again.input_scores(test), s1)
    assert again.details["clean_scores"] == res.details["clean_scores"]


@pytest.mark.parametrize("name", ["activation-clustering", "spectral-signature"])
def test_training_set_defenses_end_to_end(model, poisoned, name):
    ctx = _ctx(poisoned, train=True)
    res = defenses.BUILTIN[name]().run(model, ctx)
    _strict_json(res)
    fl = res.flagged_train
    n = len(poisoned["images"])
    assert fl.dtype == np.int64 and np.all(np.diff(fl) > 0) and fl.min() >= 0 and fl.max() < n
    assert res.details["images_analysed"] == n and res.cost.forward_passes == n
    # the poisoned target class 'wall' holds the poisoned regions: it is analysed and something is flagged there
    wall = res.details["per_class"]["wall"]
    assert wall["analysed"] and (wall.get("flagged") or wall.get("removed"))
    d = res.details  # the default rule removes about the nominal share of the training images
    assert d["rule"] == "area" and d["removed_fraction"] == pytest.approx(len(fl) / n)
    assert 0.5 * d["nominal_fraction"] <= d["removed_fraction"] <= 1.5 * d["nominal_fraction"], d
    if name == "activation-clustering":  # the trigger-driven 'wall' regions form their own small cluster
        recall = np.isin(poisoned["poison"], fl).mean()
        assert recall >= 0.5, recall
    again = defenses.BUILTIN[name]().run(model, ctx)
    np.testing.assert_array_equal(again.flagged_train, fl)
    with pytest.raises(ValueError, match="training set"):
        defenses.BUILTIN[name]().run(model, _ctx(poisoned, train=False))


# -- budgets -------------------------------------------------------------------------------------------------
def test_budget_counts_passes_and_names_what_stopped():
    meter = _features.CostMeter()
    b = _features.Budget(budget_s=None, budget_passes=10, meter=meter)
    assert not b.spent(10) and b.stopped_by is None  # exactly the budget is allowed
    meter.forward, meter.backward = 6, 3
    assert not b.spent(1) and b.spent(2) and b.stopped_by == "passes"
    assert _features.Budget(budget_s=0.0, meter=meter).spent() is True
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="budget_passes"):
            _features.Budget(budget_passes=bad)


@pytest.mark.parametrize("name,kw,budget,expected", [
    # n = 12 clean images: ranking + start mIoU (2n), two pruning steps (each keeps n in reserve), final mIoU
    ("fine-pruning", dict(step=0.1, epochs=1), 5 * 12, {"passes": 5 * 12}),
    ("activation-clustering", dict(), 100, {"images_analysed": 96, "passes": 96}),  # three batches of 32
    ("spectral-signature", dict(), 100, {"images_analysed": 96, "passes": 96}),
    ("strip", dict(n_overlays=4, batch_size=8), 20, {"clean_images_scored": 4, "passes": 16}),  # 2 images × 4 per chunk
])
def test_every_defense_honours_a_pass_budget(model, poisoned, name, kw, budget, expected):
    res = defenses.BUILTIN[name](**kw).run(model, _ctx(poisoned, train=name.endswith(("clustering", "signature")),
                                                       budget_passes=budget))
    passes = res.cost.forward_passes + res.cost.backward_passes
    assert passes == expected.pop("passes") and passes <= budget
    assert res.details["stopped_by"] == "passes" and res.details["stopped_by_budget"] is True
    assert res.details["budget_passes"] == budget
    for key, value in expected.items():
        assert res.details[key] == value, key


def test_a_defense_object_built_by_the_caller_is_checked_before_any_work():
    """scikit-learn's convention: construction stores; load_defense (which bench/defend call before loading any
    model) validates an object passed in as well as a class it builds."""
    from testbed.core.errors import UserError
    from testbed.defenses.registry import load_defense
    from testbed.defenses.strip import Strip

    bad = Strip(frr=2)  # stores without complaint
    with pytest.raises(UserError, match="frr"):
        load_defense(bad)
    assert load_defense(Strip(frr=0.05)).frr == 0.05
