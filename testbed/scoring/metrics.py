"""Segmentation and backdoor metrics (paper §3.1; docs/metrics.md), accumulated batch by batch on the model's device.

Everything is derived from integer confusion matrices filled with ONE ``torch.bincount`` per batch, so
scoring a large test set never holds all predictions and costs one kernel per batch.  Conventions:

- pixels whose label is the ignore index (255) are skipped;
- mIoU is the mean over classes whose union (ground truth ∪ prediction) is non-empty (mmsegmentation's
  nanmean); a class with an empty union has IoU NaN;
- an input *rejected* by a filter defense predicts no class at all: its pixels land in an extra column
  ``K`` of the matrix, so they are wrong for pixel accuracy and enlarge the union of their ground-truth
  class, but never count as a true positive (nor as a backdoor success).

See ``docs/metrics.md`` for the definitions with the paper's wording.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from testbed.data.h5data import IGNORE_INDEX


def _as_long(x, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=torch.long, non_blocking=True)


def _rejected_pixels(rejected, pred: torch.Tensor) -> torch.Tensor | None:
    """Per-input ([N]) or per-pixel (pred's shape) rejection mask → a bool mask of pred's shape."""
    if rejected is None:
        return None
    if not isinstance(rejected, torch.Tensor):
        rejected = torch.from_numpy(np.asarray(rejected, dtype=bool))
    rejected = rejected.to(device=pred.device, dtype=torch.bool)
    if rejected.shape == pred.shape:
        return rejected
    if rejected.ndim == 1 and pred.ndim >= 1 and rejected.shape[0] == pred.shape[0]:
        return rejected.view(-1, *([1] * (pred.ndim - 1))).expand_as(pred)
    raise ValueError(f"rejected mask has shape {tuple(rejected.shape)}; expected [{pred.shape[0]}] or {tuple(pred.shape)}")


def _check_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(shape)} vs {tuple(t.shape)}")


def _check_pred(pred: torch.Tensor, k: int) -> None:
    """Predictions must be class ids 0..K-1 (a value ≥ K would alias into another cell of the matrix)."""
    if pred.numel():
        lo, hi = torch.aminmax(pred)
        if int(lo) < 0 or int(hi) >= k:
            raise ValueError(f"predictions outside 0..{k - 1}: found {int(lo)}..{int(hi)}")


def _check_labels(x: torch.Tensor, k: int, ignore_index: int, what: str) -> None:
    bad = (x >= k) & (x != ignore_index) | (x < 0)
    if bool(bad.any()):
        raise ValueError(f"{what} outside 0..{k - 1} (ignore {ignore_index}): found {int(x[bad][0])}")


_ROWS = 256  # label values a uint8 map can hold: rows K..255 of a bincount must be empty except the ignore row


def _label_bincount(index: torch.Tensor, groups: int, k: int, ignore_index: int) -> torch.Tensor:
    """Counts ``[groups, 256, K+1]`` of ``index = (group·256 + label)·(K+1) + pred`` in ONE bincount.

    Ignored pixels fall in row ``ignore_index`` (≥ K) and are dropped by the caller, so no boolean
    masking (the expensive part) is needed; any other row ≥ K means a label outside ``0..K-1``.
    """
    n = groups * _ROWS * (k + 1)
    try:
        counts = torch.bincount(index.view(-1), minlength=n)
    except RuntimeError:  # a negative label
        raise ValueError(f"labels outside 0..{k - 1} (ignore {ignore_index})") from None
    if counts.numel() != n:
        raise ValueError(f"labels outside 0..{k - 1} (ignore {ignore_index})")
    counts = counts.view(groups, _ROWS, k + 1)
    stray = counts[:, k:].sum() - counts[:, ignore_index].sum()
    if int(stray):
        raise ValueError(f"labels outside 0..{k - 1} (ignore {ignore_index})")
    return counts


def _nan_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


def _check_k(num_classes: int, ignore_index: int = IGNORE_INDEX) -> int:
    if not 1 <= int(num_classes) <= 255:
        raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
    if not int(num_classes) <= ignore_index < _ROWS:
        raise ValueError(f"ignore_index must be in {num_classes}..255, got {ignore_index}")
    return int(num_classes)


class ConfusionMatrix:
    """Counts ``mat[t, p]`` of pixels with label ``t`` predicted as ``p`` (column ``K`` = rejected input).

    ``mat`` has shape ``[K, K+1]`` (int64) and lives on ``device``; derived metrics are fractions
    (multiply by 100 for the percentages the reports show).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = _check_k(num_classes, ignore_index)
        self.device = torch.device(device)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long, device=self.device)

    @classmethod
    def from_counts(cls, mat) -> "ConfusionMatrix":
        """Wrap existing counts (``[K, K]`` or ``[K, K+1]``; a missing rejected column is zero)."""
        mat = torch.as_tensor(mat, dtype=torch.long)
        cm = cls(mat.shape[0], mat.device)
        cm.mat[:, : mat.shape[1]] = mat
        return cm

    def update(self, pred, target, rejected=None) -> None:
        """Add a batch: ``pred`` and ``target`` of one shape (class ids), ``rejected`` per input or per pixel."""
        k = self.num_classes
        pred = _as_long(pred, self.device)
        target = _as_long(target, self.device)
        _check_shapes(pred, target)
        _check_pred(pred, k)
        rej = _rejected_pixels(rejected, pred)
        if rej is not None:
            pred = pred.masked_fill(rej, k)
        counts = _label_bincount(target * (k + 1) + pred, 1, k, self.ignore_index)
        self.mat += counts[0, :k]

    def reset(self) -> None:
        self.mat.zero_()

    # -- derived metrics (float64) ------------------------------------------------------------------
    @property
    def classes_matrix(self) -> torch.Tensor:
        """The ``[K, K]`` part: rows label, columns predicted class (rejected pixels excluded)."""
        return self.mat[:, : self.num_classes]

    @property
    def rejected(self) -> torch.Tensor:
        """Rejected pixels per label class, ``[K]``."""
        return self.mat[:, self.num_classes]

    @property
    def total(self) -> int:
        """All counted (non-ignore) pixels, rejected ones included."""
        return int(self.mat.sum())

    def iou(self) -> torch.Tensor:
        """Per-class IoU = TP / (GT + Pred − TP); NaN where the union is empty.  Rejected pixels are in GT."""
        tp = self.mat.diagonal()
        gt = self.mat.sum(1)
        pr = self.classes_matrix.sum(0)
        return _nan_div(tp, gt + pr - tp)

    def miou(self) -> float:
        """Mean IoU over classes with a non-empty union (NaN when no class has one)."""
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Correct pixels / all non-ignored pixels (rejected pixels count as wrong); NaN when empty."""
        total = self.total
        return float(self.mat.diagonal().sum()) / total if total else math.nan


class AttackMeter:
    """Accumulates everything scored on attacked inputs with one bincount per batch.

    Pixels are split by (attacker target ``t``, ground truth ``g``) into three groups: ``t == g``
    (``SAME``, the PBA pixels), ``t != g`` with both valid (``DIFF``, the ASR pixels) and ``g`` ignore
    with ``t`` valid (``GT_IGNORED``: they count for mIoU-A/PA-A, not for ASR or PBA).  Pixels with
    ``t`` ignore are skipped.  ``counts[group]`` is a ``[K, K+1]`` confusion matrix against the target.
    """

    SAME, DIFF, GT_IGNORED = 0, 1, 2

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = _check_k(num_classes, ignore_index)
        self.device = torch.device(device)
        self.ignore_index = ignore_index
        k = self.num_classes
        self.counts = torch.zeros(3, k, k + 1, dtype=torch.long, device=self.device)

    def update(self, pred, target, gt, rejected=None) -> None:
        """Add a batch of predictions on attacked inputs, the attacker's target labels and the ground truth."""
        k = self.num_classes
        wide = not (target.dtype == torch.uint8 if isinstance(target, torch.Tensor) else np.asarray(target).dtype == np.uint8)
        pred = _as_long(pred, self.device)
        target = _as_long(target, self.device)
        gt = _as_long(gt, self.device)
        if wide and target.numel():  # a value > 255 would alias into the next group's rows
            lo, hi = torch.aminmax(target)
            if int(lo) < 0 or int(hi) >= _ROWS:
                raise ValueError(f"target labels outside 0..{k - 1} (ignore {self.ignore_index})")
        _check_shapes(pred, target, gt)
        _check_pred(pred, k)
        _check_labels(gt, k, self.ignore_index, "ground-truth labels")
        rej = _rejected_pixels(rejected, pred)
        if rej is not None:
            pred = pred.masked_fill(rej, k)
        group = (target != gt).long().masked_fill_(gt == self.ignore_index, self.GT_IGNORED)
        counts = _label_bincount((group * _ROWS + target) * (k + 1) + pred, 3, k, self.ignore_index)
        self.counts += counts[:, :k]

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def attacked(self) -> ConfusionMatrix:
        """Predictions vs the attacker's target labels over all target-valid pixels: mIoU-A, PA-A."""
        return ConfusionMatrix.from_counts(self.counts.sum(0))

    @property
    def pba_matrix(self) -> ConfusionMatrix:
        """Predictions vs labels over the pixels whose target equals the ground truth: PBA."""
        return ConfusionMatrix.from_counts(self.counts[self.SAME])

    @property
    def asr_counts(self) -> tuple[int, int]:
        """(pixels predicted as their target, all pixels whose target ≠ ground truth, both valid)."""
        diff = self.counts[self.DIFF]
        return int(diff.diagonal().sum()), int(diff.sum())

    def asr(self) -> float:
        hits, total = self.asr_counts
        return hits / total if total else math.nan

    def pba(self) -> float:
        return self.pba_matrix.miou()


# -- one-shot functions (fractions; NaN when the pixel set is empty) ------------------------------
def asr(pred, target, gt, rejected=None, ignore_index: int = IGNORE_INDEX) -> float:
    """Attack success rate: over pixels with target ≠ gt (neither ignore), the share predicted as target.

    Pixels of rejected inputs stay in the denominator and are never successes (the input was defended).
    """
    pred, target, gt = (torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).long()
                        for a in (pred, target, gt))
    _check_shapes(pred, target, gt)
    considered = (target != gt) & (target != ignore_index) & (gt != ignore_index)
    hits = considered & (pred == target)
    rej = _rejected_pixels(rejected, pred)
    if rej is not None:
        hits &= ~rej
    total = int(considered.sum())
    return int(hits.sum()) / total if total else math.nan


def pba(pred, target, gt, num_classes: int, rejected=None, ignore_index: int = IGNORE_INDEX) -> float:
    """Preserved benign accuracy: mIoU over attacked pixels whose target equals the ground truth."""
    meter = AttackMeter(num_classes, "cpu" if not isinstance(pred, torch.Tensor) else pred.device, ignore_index)
    meter.update(pred, target, gt, rejected)
    return meter.pba()


def der_seg(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> float:
    """DER_seg = [max(0, ΔASR) − max(0, ΔmIoU-B) + 1] / 2 with Δ = before − after, as fractions.

    ``before``/``after`` hold percentages under the keys ``"ASR"`` and ``"mIoU-B"`` (the scorer's output).
    1 = backdoor fully removed at no clean cost, 0.5 = nothing gained or lost, 0 = clean accuracy destroyed.
    """
    for name, d in (("before", before), ("after", after)):
        for key in ("ASR", "mIoU-B"):
            v = d.get(key)
            if v is None or math.isnan(float(v)):
                raise ValueError(f"DER_seg needs {key!r} in the {name} scores (scores of data with an attacked test set)")
    d_asr = (float(before["ASR"]) - float(after["ASR"])) / 100.0
    d_miou = (float(before["mIoU-B"]) - float(after["mIoU-B"])) / 100.0
    return (max(0.0, d_asr) - max(0.0, d_miou) + 1.0) / 2.0
