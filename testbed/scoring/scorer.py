"""Scoring a model (or precomputed predictions) on a dataset file, as in the paper's §3.1 (docs/metrics.md).

One code path for all scoring: :class:`Scorer` accumulates confusion matrices batch by batch;
:func:`score_model` feeds it a model's predictions read split by split from the HDF5 file (never a whole
split in memory), and :func:`score_predictions` feeds it arrays someone else computed (defense runner,
zoo).  Results are plain dicts of percentages, ready for JSON (NaN becomes ``None``).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from testbed.data import h5data
from testbed.core import progress
from testbed.core.errors import UserError
from testbed.data.h5data import IGNORE_INDEX, SegFile, open_dataset, read_rows
from testbed.scoring.metrics import AttackMeter, ConfusionMatrix

SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")

InputFilter = Callable[[np.ndarray], Any]  # uint8 images [B,H,W,3] -> bool [B], True = rejected
DataRef = SegFile | str | os.PathLike  # a dataset file: its path, or a file already open (left open)


@contextmanager
def opened(data: DataRef, check_labels: bool = False) -> Iterator[SegFile]:
    """``data`` as an open :class:`SegFile`: one already open is used as it is (and left open), a path is opened
    for the block.  Lets one model × defense pair read its file through a single open handle."""
    if isinstance(data, SegFile):
        yield data
        return
    with open_dataset(data, check_labels=check_labels) as f:
        yield f


def _pct(x: float) -> float | None:
    return None if x is None or math.isnan(x) else 100.0 * float(x)


def _rows(ds, index: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``ds`` (numpy or h5py), through ``index`` when given, read in one selection."""
    if index is None:
        return np.asarray(ds[start:stop])
    idx = index[start:stop]
    if isinstance(ds, np.ndarray):
        return ds[idx]
    return read_rows(ds, idx)


def to_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` → float ``[B,3,H,W]`` in [0,1] on ``device`` (converted there, where it is cheapest).

    The one conversion every model input goes through (the models normalise inside).  Read-only arrays (a
    defense context's) are copied: torch wants a writable buffer.
    """
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:
        images = images.copy()
    x = torch.from_numpy(images).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {tuple(images.shape)}")


@torch.inference_mode()
def _forward(model: nn.Module, images: np.ndarray, device: torch.device, num_classes: int | None = None) -> torch.Tensor:
    """Argmax class ids (int64 [B,H,W]) on ``device``."""
    logits = model(to_input(images, device))["out"]
    if num_classes is not None and logits.shape[1] != num_classes:
        raise UserError(
            f"the model predicts {logits.shape[1]} classes but the data has {num_classes}; score it on data with the same classes"
        )
    if logits.shape[-2:] != images.shape[1:3]:
        raise ValueError(f"model output {tuple(logits.shape[-2:])} does not match the input size {images.shape[1:3]}")
    return logits.argmax(1)


def iter_predictions(
    model: nn.Module,
    images,
    device: torch.device,
    batch_size: int,
    index: np.ndarray | None = None,
    num_classes: int | None = None,
    desc: str = "predict",
) -> Iterator[tuple[int, int, np.ndarray, torch.Tensor]]:
    """Yield ``(start, stop, images uint8, pred int64 on device)`` batch by batch, model in eval mode."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    n = len(index) if index is not None else int(images.shape[0])
    was_training = model.training
    model.eval()
    try:
        for start in progress.bar(range(0, n, batch_size), total=-(-n // batch_size), desc=desc):
            stop = min(n, start + batch_size)
            x = _rows(images, index, start, stop)
            _check_images(x)
            yield start, stop, x, _forward(model, x, device, num_classes)
    finally:
        model.train(was_training)


def predict(model: nn.Module, images, device: torch.device | str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Argmax predictions uint8 ``[N,H,W]`` of ``model`` on uint8 images ``[N,H,W,3]`` (numpy or h5py).

    The model is moved to ``device``; images go through in batches without gradients.
    """
    device = torch.device(device)
    model.to(device)
    n, h, w = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    out = np.empty((n, h, w), dtype=np.uint8)
    for start, stop, _, pred in iter_predictions(model, images, device, batch_size):
        out[start:stop] = pred.to(torch.uint8).cpu().numpy()
    return out


def _filter_mask(input_filter: InputFilter, images: np.ndarray) -> np.ndarray:
    mask = input_filter(images)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).reshape(-1)
    if mask.shape[0] != images.shape[0]:
        raise ValueError(f"input_filter returned {mask.shape[0]} flags for {images.shape[0]} images")
    return mask.astype(bool)


def _take(x, keep: np.ndarray):
    """Rows ``keep`` (bool [B]) of a numpy array or a tensor (indexed on its own device)."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(keep, device=x.device)]
    return np.asarray(x)[keep]


def distance_bin_labels(edges: Sequence[int]) -> list[str]:
    """``["d<=8", "8<d<=16", ..., "d>32"]`` for upper bin edges ``edges`` (``["all"]`` for none)."""
    lo, hi = [None, *edges], [*edges, None]
    return [("all" if b is None else f"d<={b}") if a is None else (f"d>{a}" if b is None else f"{a}<d<={b}")
            for a, b in zip(lo, hi)]


class DistanceASR:
    """ASR per trigger–victim distance bin (IBA's ``/test_attacked/distance``): bin b holds edges[b−1] < d ≤ edges[b].

    Each bin is an :class:`AttackMeter`, so a bin's ASR is computed exactly like the overall ASR.
    """

    def __init__(self, edges: Sequence[int], num_classes: int, device: torch.device) -> None:
        self.edges = [int(e) for e in edges]
        self.meters = [AttackMeter(num_classes, device) for _ in range(len(self.edges) + 1)]
        self.images = [0] * len(self.meters)

    def update(self, pred, target, gt, rejected, distance) -> None:
        bins = np.searchsorted(self.edges, np.asarray(distance), side="left")
        for b in np.unique(bins):
            keep = bins == b
            self.meters[b].update(_take(pred, keep), np.asarray(target)[keep], np.asarray(gt)[keep],
                                  None if rejected is None else np.asarray(rejected)[keep])
            self.images[b] += int(keep.sum())

    def result(self) -> list[dict[str, Any]]:
        rows = []
        for label, edge, meter, n in zip(distance_bin_labels(self.edges), [*self.edges, None], self.meters, self.images):
            hits, total = meter.asr_counts
            rows.append({"bin": label, "max_distance": edge, "images": n, "pixels": total, "asr_success": hits,
                         "ASR": _pct(meter.asr())})
        return rows


class FalseFlips:
    """Object-bound's false flips: untriggered victim pixels (``/test_attacked/untriggered`` ≠ 255, which holds
    the class they would wrongly flip to) predicted as that class.  A rejected input flips nothing."""

    def __init__(self) -> None:
        self.flipped = self.total = 0

    def update(self, pred, untriggered, rejected=None) -> None:
        pred = torch.as_tensor(pred)
        u = torch.as_tensor(np.asarray(untriggered), device=pred.device).long()
        valid = u != IGNORE_INDEX
        hit = (pred.long() == u) & valid
        if rejected is not None:
            hit &= ~torch.as_tensor(np.asarray(rejected, dtype=bool), device=pred.device).view(-1, 1, 1)
        self.flipped += int(hit.sum())
        self.total += int(valid.sum())

    def result(self) -> dict[str, Any]:
        return {"rate": _pct(self.flipped / self.total) if self.total else None, "pixels": self.total,
                "flipped": self.flipped}


class Scorer:
    """Accumulates the benign and attacked metrics of docs/metrics.md; :meth:`result` gives the score dict.

    Attack-specific extras appear only when their per-image arrays are given to :meth:`update_attacked`:
    ``"ASR-by-distance"`` (IBA, with ``distance_bins``) and ``"false-flip"`` (object-bound).
    """

    def __init__(self, classes: Sequence[str], device: torch.device | str = "cpu", *, attacked: bool = True,
                 filtered: bool = False, distance_bins: Sequence[int] | None = None) -> None:
        self.classes = list(classes)
        k = len(self.classes)
        self.device = torch.device(device)
        self.benign = ConfusionMatrix(k, self.device)
        self.benign_all = ConfusionMatrix(k, self.device)  # all of /test (the paper's benign rows)
        self.attack = AttackMeter(k, self.device) if attacked else None
        self.filtered = filtered
        self.n_benign = self.n_attacked = 0
        self.rejected_benign = self.rejected_attacked = 0
        self.distance_bins = list(distance_bins or [])
        self.by_distance: DistanceASR | None = None
        self.false_flips: FalseFlips | None = None

    def update_benign(self, pred, labels, rejected=None, in_benign_set=None) -> None:
        """Clean test images: all count for mIoU-B-all; those with ``in_benign_set`` (bool [B], default all)
        also for mIoU-B."""
        self.benign_all.update(pred, labels, rejected)
        if in_benign_set is not None:
            keep = np.asarray(in_benign_set, dtype=bool)
            if not keep.any():
                return
            if not keep.all():
                pred = pred[torch.as_tensor(keep, device=pred.device)] if isinstance(pred, torch.Tensor) else pred[keep]
                labels = np.asarray(labels)[keep]
                rejected = None if rejected is None else np.asarray(rejected)[keep]
        self.benign.update(pred, labels, rejected)
        self.n_benign += len(pred)
        if rejected is not None:
            self.rejected_benign += int(np.asarray(rejected).sum())

    def update_attacked(self, pred, target, gt, rejected=None, distance=None, untriggered=None) -> None:
        """Attacked images; ``distance`` (int [B]) and ``untriggered`` (uint8 [B,H,W]) feed the extras."""
        if self.attack is None:
            raise ValueError("this Scorer was made with attacked=False")
        self.attack.update(pred, target, gt, rejected)
        self.n_attacked += len(pred)
        if rejected is not None:
            self.rejected_attacked += int(np.asarray(rejected).sum())
        if distance is not None:
            if self.by_distance is None:
                self.by_distance = DistanceASR(self.distance_bins, len(self.classes), self.device)
            self.by_distance.update(pred, target, gt, rejected, distance)
        if untriggered is not None:
            self.false_flips = self.false_flips or FalseFlips()
            self.false_flips.update(pred, untriggered, rejected)

    def _per_class(self, cm: ConfusionMatrix) -> dict[str, float | None]:
        return {name: _pct(v) for name, v in zip(self.classes, cm.iou().cpu().tolist())}

    def result(self) -> dict[str, Any]:
        b = self.benign
        out: dict[str, Any] = {
            "mIoU-B": _pct(b.miou()),
            "PA-B": _pct(b.pixel_accuracy()),
            "mIoU-B-all": _pct(self.benign_all.miou()),
            "PA-B-all": _pct(self.benign_all.pixel_accuracy()),
            "mIoU-A": None,
            "PA-A": None,
            "ASR": None,
            "PBA": None,
            "per_class_iou_b": self._per_class(b),
            "per_class_iou_a": None,
            "classes": self.classes,
            "ignore_index": IGNORE_INDEX,
            "num_images": {"benign": self.n_benign, "attacked": self.n_attacked if self.attack is not None else None},
            "pixels": {"benign": b.total, "attacked": None, "asr": None, "asr_success": None, "pba": None},
            "confusion_benign": b.classes_matrix.cpu().tolist(),
            "confusion_attacked": None,
            "confusion_note": "rows = label (ground truth; attacker's target for attacked), columns = predicted class; "
            "ignore pixels and rejected inputs not included",
        }
        if self.attack is not None:
            a, p = self.attack.attacked, self.attack.pba_matrix
            hits, total = self.attack.asr_counts
            out.update({
                "mIoU-A": _pct(a.miou()),
                "PA-A": _pct(a.pixel_accuracy()),
                "ASR": _pct(self.attack.asr()),
                "PBA": _pct(p.miou()),
                "per_class_iou_a": self._per_class(a),
                "confusion_attacked": a.classes_matrix.cpu().tolist(),
            })
            out["pixels"].update(attacked=a.total, asr=total, asr_success=hits, pba=p.total)
        if self.by_distance is not None:
            out["ASR-by-distance"] = self.by_distance.result()
        if self.false_flips is not None:
            out["false-flip"] = self.false_flips.result()
        if self.filtered:
            out["rejected"] = {
                "benign": self.rejected_benign,
                "benign_total": self.n_benign,
                "attacked": self.rejected_attacked if self.attack is not None else None,
                "attacked_total": self.n_attacked if self.attack is not None else None,
                "benign_pixels_per_class": b.rejected.cpu().tolist(),
                "attacked_pixels_per_class": self.attack.attacked.rejected.cpu().tolist() if self.attack is not None else None,
            }
        return out


@dataclass
class BenignPredictions:
    """Predictions on the clean test set (uint8 ``[N,H,W]``) and its ground truth.

    ``rejected``: optional bool ``[N]`` (True = rejected by a filter defense).  ``in_set``: optional bool ``[N]``
    when ``pred``/``labels`` hold the whole clean test set: only those images count for mIoU-B/PA-B, all of them
    for mIoU-B-all/PA-B-all (else both are scored on the images given).
    """

    pred: Any
    labels: Any
    rejected: Any = None
    in_set: Any = None


@dataclass
class AttackedPredictions:
    """Predictions on the attacked test set (uint8 ``[M,H,W]``), the attacker's target and the ground truth.

    ``rejected``: optional bool ``[M]``.  ``distance`` (int ``[M]``, scored with ``distance_bins``) and
    ``untriggered`` (uint8 ``[M,H,W]``) add ``"ASR-by-distance"`` and ``"false-flip"`` (see :class:`Scorer`).
    """

    pred: Any
    target: Any
    gt: Any
    rejected: Any = None
    distance: Any = None
    untriggered: Any = None


def _slice(a: Any, s: int, e: int, dtype: Any = None) -> np.ndarray | None:
    """Rows ``s:e`` of an optional array (a mask is converted whole: it may be a list)."""
    if a is None:
        return None
    return np.asarray(a, dtype=dtype)[s:e] if dtype is not None else np.asarray(a[s:e])


def score_predictions(classes: Sequence[str], benign: BenignPredictions, attacked: AttackedPredictions | None = None,
                      *, device: torch.device | str = "cpu", batch_size: int = 256,
                      distance_bins: Sequence[int] | None = None) -> dict[str, Any]:
    """Score precomputed predictions exactly as :func:`score_model` does.

    Without ``attacked`` the attacked keys are ``None`` (a clean file).
    """
    filtered = benign.rejected is not None or (attacked is not None and attacked.rejected is not None)
    scorer = Scorer(classes, device, attacked=attacked is not None, filtered=filtered, distance_bins=distance_bins)
    n = len(benign.pred)
    if len(benign.labels) != n:
        raise ValueError(f"{n} benign predictions but {len(benign.labels)} labels")
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        scorer.update_benign(_slice(benign.pred, s, e), _slice(benign.labels, s, e), _slice(benign.rejected, s, e, bool),
                             _slice(benign.in_set, s, e, bool))
    if attacked is not None:
        m = len(attacked.pred)
        if not len(attacked.target) == len(attacked.gt) == m:
            raise ValueError("attacked predictions, targets and ground truth differ in length")
        for s in range(0, m, batch_size):
            e = min(m, s + batch_size)
            scorer.update_attacked(_slice(attacked.pred, s, e), _slice(attacked.target, s, e), _slice(attacked.gt, s, e),
                                   _slice(attacked.rejected, s, e, bool), _slice(attacked.distance, s, e),
                                   _slice(attacked.untriggered, s, e))
    return scorer.result()


def _extra(f, name: str):
    """``/test_attacked/<name>`` (an attack's per-image array) or None; a length mismatch is a damaged file."""
    key = h5data.path("test_attacked", name)
    if key not in f.file:
        return None
    ds, n = f.file[key], f.length("test_attacked")
    if ds.shape[0] != n:
        raise UserError(f"{f.path}: /{key} has {ds.shape[0]} rows but /test_attacked/images has {n}; re-create the "
                        "file with `testbed poison`")
    return ds


def score_model(
    model: nn.Module,
    data_path: DataRef,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    input_filter: InputFilter | None = None,
) -> dict[str, Any]:
    """Score ``model`` on a dataset file: benign test set vs ground truth, attacked test set (if any).

    ``data_path``: the file's path, or the file already open (:func:`opened`).
    The benign test set is ``/test`` at ``/test_benign/index`` when present, else all of ``/test``.
    ``input_filter(images uint8 [B,H,W,3]) -> bool [B]`` (True = rejected) is applied to both test sets;
    rejected inputs predict no class (see :mod:`testbed.scoring.metrics`), and rejection counts are added.
    """
    device = torch.device(device)
    model.to(device)
    with opened(data_path, check_labels=True) as f:
        h5 = f.file
        attacked = h5data.TEST_ATTACKED_IMAGES in h5
        if attacked:
            for name in (h5data.TEST_ATTACKED_LABELS, h5data.TEST_ATTACKED_GT):
                if name not in h5:
                    raise UserError(f"{f.path} has /test_attacked/images but no /{name}; re-create it with `testbed poison`")
        k = f.num_classes
        dist, untrig = (_extra(f, name) if attacked else None for name in ("distance", "untriggered"))
        params = f.attack.get("params") if isinstance(f.attack, dict) else None
        bins = params.get("distance_bins") if isinstance(params, dict) else None
        scorer = Scorer(f.classes, device, attacked=attacked, filtered=input_filter is not None,
                        distance_bins=bins if isinstance(bins, list) else None)
        index = np.asarray(h5[h5data.TEST_BENIGN_INDEX][()], dtype=np.int64) if h5data.TEST_BENIGN_INDEX in h5 else None
        if index is not None and index.size and (index.min() < 0 or index.max() >= f.length("test")):
            raise UserError(f"{f.path}: /test_benign/index points outside /test; re-create the file")
        labels = h5[h5data.TEST_LABELS]
        # every clean test image once: all of them for mIoU-B-all, those at /test_benign/index for mIoU-B
        in_set = None if index is None else np.isin(np.arange(f.length("test")), index)
        for s, e, x, pred in iter_predictions(model, h5[h5data.TEST_IMAGES], device, batch_size, None, k, "score benign"):
            rejected = _filter_mask(input_filter, x) if input_filter is not None else None
            scorer.update_benign(pred, _rows(labels, None, s, e), rejected, None if in_set is None else in_set[s:e])
        if attacked:
            target, gt = h5[h5data.TEST_ATTACKED_LABELS], h5[h5data.TEST_ATTACKED_GT]
            for s, e, x, pred in iter_predictions(model, h5[h5data.TEST_ATTACKED_IMAGES], device, batch_size, None, k,
                                                   "score attacked"):
                rejected = _filter_mask(input_filter, x) if input_filter is not None else None
                scorer.update_attacked(pred, np.asarray(target[s:e]), np.asarray(gt[s:e]), rejected,
                                       None if dist is None else np.asarray(dist[s:e]),
                                       None if untrig is None else np.asarray(untrig[s:e]))
    return scorer.result()
