"""Helpers the built-in defenses share: model inputs, classifier features, clean mIoU, budget and cost.

Kept here so that each defense file holds only its algorithm.  Cost counts are *per image*: one image
through the model forwards is one forward pass, one image through a backward is one backward pass, so the
numbers do not depend on the batch size.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.models import classifier_features  # noqa: F401 - re-exported for the defenses
from testbed.core.paramtypes import is_int, is_num  # noqa: F401 - re-exported for the defenses' checks
from testbed.defenses.protocol import Cost
from testbed.scoring.metrics import ConfusionMatrix
from testbed.scoring.scorer import to_input  # noqa: F401 - re-exported for the defenses


@torch.no_grad()
def predict_batches(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """Argmax predictions uint8 ``[N,H,W]`` (eval mode, no gradients)."""
    out = np.empty(images.shape[:3], dtype=np.uint8)
    for s in range(0, len(images), batch_size):
        out[s : s + batch_size] = model(to_input(images[s : s + batch_size], device))["out"].argmax(1).to(torch.uint8).cpu().numpy()
    return out


def clean_miou(model: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, device: torch.device,
               batch_size: int = 32, ignore_index: int = 255) -> float:
    """mIoU (fraction, nanmean over classes with a non-empty union) of ``model`` on the clean subset."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device, ignore_index=ignore_index)
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                pred = model(to_input(images[s : s + batch_size], device))["out"].argmax(1)
                cm.update(pred, torch.from_numpy(np.array(labels[s : s + batch_size])).to(device))
    finally:
        model.train(was_training)
    return cm.miou()


def pooled_class_features(
    features: torch.Tensor, classes: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked average pooling of ``features [B,C,h,w]`` over each class region of ``classes [B,H,W]``.

    The class masks are area-downsampled to the feature grid (a soft weight per feature cell), so a small
    region still gets a vector even when it is narrower than one feature cell.  Returns
    ``(vectors [M,C], image [M], class [M], area [M] in label pixels)`` for every (image, class) present.
    """
    b, c, h, w = features.shape
    valid = classes != ignore_index
    onehot = F.one_hot(torch.where(valid, classes, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid.unsqueeze(1)
    area = onehot.sum((2, 3))  # [B,K] pixels per class
    weights = F.adaptive_avg_pool2d(onehot, (h, w)) if onehot.shape[-2:] != (h, w) else onehot  # [B,K,h,w]
    sums = torch.einsum("bkhw,bchw->bkc", weights, features.float())
    mass = weights.sum((2, 3))  # [B,K]
    img, cls = torch.nonzero(area > 0, as_tuple=True)
    vectors = sums[img, cls] / mass[img, cls].clamp_min(1e-12).unsqueeze(1)
    return vectors, img, cls, area[img, cls]


class CostMeter:
    """Counts per-image forward/backward passes next to wall seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.forward = 0
        self.backward = 0

    @property
    def passes(self) -> int:
        """Forward + backward passes so far: the unit of ``ctx.budget_passes``."""
        return int(self.forward) + int(self.backward)

    def cost(self) -> Cost:
        return Cost(seconds=time.perf_counter() - self.start, forward_passes=int(self.forward), backward_passes=int(self.backward))


class Budget:
    """A defense's compute budget: wall seconds (``budget_s``) and/or passes (``budget_passes``).

    Seconds depend on the machine and its load; passes (per-image forward + backward passes, counted by
    ``meter``) do not, so a pass budget gives the same result on any machine.  ``spent(next_passes)`` is asked
    before each unit of work: it is true once ``budget_s`` seconds have passed (the unit in progress is
    finished first: time cannot be predicted) or when the unit's ``next_passes`` would take the meter past
    ``budget_passes`` (a pass budget is never exceeded).  ``stopped_by`` names the budget that said stop:
    ``"passes"``, ``"seconds"`` or None.  None for both budgets = unlimited.
    """

    def __init__(self, budget_s: float | None = None, budget_passes: int | None = None,
                 meter: CostMeter | None = None) -> None:
        if budget_passes is not None and (isinstance(budget_passes, bool) or int(budget_passes) != budget_passes
                                          or budget_passes < 1):
            raise ValueError(f"budget_passes must be a positive integer, got {budget_passes!r}")
        if budget_s is not None and not budget_s >= 0:
            raise ValueError(f"budget_s must be at least 0 seconds, got {budget_s!r}")
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.budget_passes = None if budget_passes is None else int(budget_passes)
        self.meter = meter if meter is not None else CostMeter()
        self.stopped_by: str | None = None

    @classmethod
    def for_context(cls, ctx, meter: CostMeter) -> "Budget":
        """The budgets the runner put in the context (``budget_s``, ``budget_passes``), metered by ``meter``."""
        return cls(getattr(ctx, "budget_s", None), getattr(ctx, "budget_passes", None), meter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, next_passes: int = 0) -> bool:
        """True when the next unit of work (``next_passes`` passes) must not start; records ``stopped_by``."""
        if self.budget_passes is not None and self.meter.passes + int(next_passes) > self.budget_passes:
            self.stopped_by = "passes"
        elif self.budget_s is not None and self.elapsed() >= self.budget_s:
            self.stopped_by = "seconds"
        else:
            return False
        return True

    def summary(self) -> dict:
        """The budget keys every built-in defense puts in ``details``."""
        return {"budget_s": self.budget_s, "budget_passes": self.budget_passes, "stopped_by": self.stopped_by,
                "stopped_by_budget": self.stopped_by is not None}


def report(progress: Callable[[float, str], None], fraction: float, message: str) -> None:
    """Call the runner's progress callback with a fraction clipped to [0, 1]."""
    progress(float(min(1.0, max(0.0, fraction))), message)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel CE, mean over non-ignored pixels (0 when all are ignored, never NaN)."""
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp_min(1)


def training_set_features(model: nn.Module, ctx, class_source: str = "labels", batch_size: int = 32,
                          budget: Budget | None = None, meter: CostMeter | None = None) -> dict[str, np.ndarray | int | bool]:
    """Per (image, class) pooled classifier features over ``ctx.train`` (read-only), batch by batch.

    ``class_source="labels"`` uses the training labels as given (possibly poisoned: that is what the defender
    holds); ``"predictions"`` uses the model's own argmax.  Asks ``budget`` before every batch (one forward
    pass per image) and stops there once it is spent.  Returns ``vectors [M,C]`` float32, ``image [M]`` int64
    (training index), ``cls [M]``, ``area [M]``, ``images_seen`` and ``stopped_by_budget``.
    """
    if ctx.train is None:
        raise ValueError("this defense needs the training set (uses_training_set = True); the runner did not pass it")
    if class_source not in ("labels", "predictions"):
        raise ValueError(f"class_source must be 'labels' or 'predictions', got {class_source!r}")
    n = len(ctx.train)
    vecs, imgs, clss, areas = [], [], [], []
    seen, stopped = 0, False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                e = min(n, s + batch_size)
                if budget is not None and budget.spent(e - s):
                    stopped = True
                    break
                feats, logits = classifier_features(model, to_input(ctx.train.images[s:e], ctx.device))
                if class_source == "labels":
                    classes = torch.from_numpy(np.array(ctx.train.labels[s:e])).to(ctx.device).long()
                else:
                    classes = logits.argmax(1)
                v, i, c, a = pooled_class_features(feats, classes, ctx.num_classes, ctx.ignore_index)
                vecs.append(v.cpu().numpy().astype(np.float32))
                imgs.append(i.cpu().numpy().astype(np.int64) + s)
                clss.append(c.cpu().numpy().astype(np.int64))
                areas.append(a.cpu().numpy().astype(np.float64))
                seen = e
                if meter is not None:
                    meter.forward += e - s
                report(ctx.progress, 0.8 * seen / n, f"features {seen}/{n}")
    finally:
        model.train(was_training)
    c = 0 if not vecs else vecs[0].shape[1]
    cat = lambda xs, dt, shape=(0,): np.concatenate(xs) if xs else np.zeros(shape, dt)  # noqa: E731
    return {"vectors": cat(vecs, np.float32, (0, c)), "image": cat(imgs, np.int64), "cls": cat(clss, np.int64),
            "area": cat(areas, np.float64), "images_seen": seen, "stopped_by_budget": stopped}


RULES = ("area", "any")


def flag_images(image: np.ndarray, area: np.ndarray, flagged: np.ndarray, rule: str = "area") -> np.ndarray:
    """Training indices to drop from per-(image, class) flags.

    ``area`` (default): an image is dropped when its flagged regions cover at least half of its labelled
    pixels (a vote weighted by class area).  A region is a sample of the per-class analysis, but an image
    holds several regions; the vote turns region flags into whole images so that the share of images removed
    tracks the share of labelled pixels flagged — the analogue of removing the flagged samples in
    classification, where a sample is an image.  ``any``: an image is dropped when any one of its regions is
    flagged; with m regions per image that removes up to 1 − (1 − f)^m of the images for a per-region rate f
    (measured: 54% of the images for spectral signatures' nominal 15%), mixing poison removal with data loss.
    """
    if rule == "any":
        return np.unique(image[flagged]).astype(np.int64)
    if rule == "area":
        ids, inv = np.unique(image, return_inverse=True)
        total = np.bincount(inv, weights=area, minlength=len(ids))
        bad = np.bincount(inv, weights=area * flagged, minlength=len(ids))
        return ids[bad >= 0.5 * total].astype(np.int64)
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")


def check(ok: bool, name: str, rule: str, value: Any) -> None:
    """Raise ``ValueError("NAME must be RULE, got VALUE")`` unless ``ok``: errors name the parameter."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def check_clean(ctx, name: str) -> int:
    """The size of the defender's clean subset; an empty one is refused (``NAME needs ...``)."""
    n = len(ctx.clean_images)
    if n == 0:
        raise ValueError(f"{name} needs a non-empty clean subset")
    return n


def check_rule(rule: str, class_source: str) -> None:
    """Validation (in ``check_params``) of the two choices both training-set defenses share."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if class_source not in ("labels", "predictions"):
        raise ValueError(f"class_source must be 'labels' or 'predictions', got {class_source!r}")


def check_set_params(obj) -> None:
    """The parameters both training-set filters share: ``rule``, ``class_source``, ``min_class_vectors``,
    ``batch_size``."""
    check_rule(obj.rule, obj.class_source)
    check(is_int(obj.min_class_vectors), "min_class_vectors", "an integer >= 0", obj.min_class_vectors)
    check(is_int(obj.batch_size, 1), "batch_size", "an integer >= 1", obj.batch_size)


def begin_set_filter(defense, model: nn.Module, ctx) -> tuple[dict, Budget, CostMeter]:
    """What a training-set filter starts with: its parameters checked, the budget and pass meter, and the
    training set's per-(image, class) features (:func:`training_set_features`)."""
    defense.check_params()
    meter = CostMeter()
    budget = Budget.for_context(ctx, meter)
    feats = training_set_features(model.to(ctx.device), ctx, defense.class_source, defense.batch_size, budget, meter)
    return feats, budget, meter


def flag_per_class(feats: dict, ctx, min_class_vectors: int, analyse: Callable[[np.ndarray], tuple[np.ndarray, dict]],
                   verb: str, rule: str, class_source: str, nominal: float | None = None) -> tuple[np.ndarray, dict]:
    """Run ``analyse(vectors) -> (flags, info)`` on each class's (image, class) vectors; flag images.

    The shared part of activation clustering and spectral signatures: classes with fewer than
    ``min_class_vectors`` vectors are not analysed; images are flagged from their vectors by ``rule``.
    ``nominal`` is the share of the training set the paper's rule removes (spectral signatures: 1.5ε); None
    = the share of labelled pixels in flagged regions (activation clustering: the clusters judged poisoned).
    Returns the training indices to drop and the details both defenses report, among them
    ``removed_fraction`` (images dropped ÷ training images) next to ``nominal_fraction``.
    """
    vectors, cls, area = feats["vectors"], feats["cls"], feats["area"]
    flagged = np.zeros(len(vectors), dtype=bool)
    per_class: dict = {}
    for k in range(ctx.num_classes):
        sel = np.flatnonzero(cls == k)
        name = ctx.classes[k]
        if len(sel) < min_class_vectors:
            per_class[name] = {"vectors": int(len(sel)), "analysed": False}
            continue
        flags, info = analyse(vectors[sel])
        flagged[sel] = flags
        per_class[name] = {"vectors": int(len(sel)), "analysed": True, **info}
        report(ctx.progress, 0.8 + 0.2 * (k + 1) / ctx.num_classes, f"{verb} class {name}")
    drop = flag_images(feats["image"], area, flagged, rule)
    n = len(ctx.train)
    area_fraction = float(area[flagged].sum() / area.sum()) if area.sum() > 0 else 0.0
    details = {
        "per_class": per_class,
        "flagged_vectors": int(flagged.sum()),
        "flagged_images": int(len(drop)),
        "removed_fraction": len(drop) / n if n else 0.0,
        "nominal_fraction": area_fraction if nominal is None else float(nominal),
        "flagged_area_fraction": area_fraction,
        "images_analysed": int(feats["images_seen"]),
        "train_size": n,
        "class_source": class_source,
        "rule": rule,
        "stopped_by_budget": bool(feats["stopped_by_budget"]),
    }
    return drop, details
