"""BadNets generalized to segmentation (paper §2.1, Remark 1): one image-level target label for every sample.

T(y) = y_t for every poisoned sample, where y_t is the label map of one training image.  The paper takes
"a road scape image randomly selected from the dataset"; we make that reproducible: by default y_t is drawn
uniformly, with the seed, among the ``top_k`` (5) training images with the most ``target_class`` ('road')
pixels (ties broken by the lower index).  ``target_image=I`` chooses the image instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.data import h5data
from testbed.attacks.base import Attack, Param
from testbed.core.errors import ParamError
from testbed.core.paramtypes import is_int
from testbed.data.h5data import IGNORE_INDEX, find_class

_BLOCK_ROWS = 1024
TARGET_STREAM = 1  # seed stream for drawing the target image (see attacks.poison for the others)


def top_by_count(counts: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest positive counts, largest first, ties by lower index."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.lexsort((np.arange(counts.size), -counts))  # primary: count descending; then index ascending
    order = order[counts[order] > 0]
    return order[:k]


class BadNets(Attack):
    """Image-level target: every poisoned sample gets the label map of one training image.

    ``fit(data, seed)`` validates the parameters, picks that image (``target_image_``) and keeps its labels
    (``target_labels_``).
    """

    name = "badnets"
    params_doc = {
        "target_image": Param("index of the training image whose labels are the target (default: drawn by seed "
                              "among the 5 images with the most 'road' pixels)", type=int, metavar="I"),
    }

    def __init__(self, target_image: int | None = None, *, target_class: str = "road", top_k: int = 5) -> None:
        self.target_image = target_image
        self.target_class = target_class
        self.top_k = top_k

    def check_params(self, classes: list[str]) -> None:
        self._check_params()

    def _check_params(self) -> None:
        t = self.target_image
        if t is not None and not is_int(t):
            raise ParamError(f"{{target_image}} must be a non-negative training image index, got {t!r}")
        if not is_int(self.top_k, 1):
            raise ParamError(f"{{top_k}} must be at least 1, got {self.top_k!r}")

    def choose_target(self, labels: Any, classes: list[str], seed: int) -> int:
        """The target image index among ``labels`` [N,H,W] (array or h5py dataset, read in blocks)."""
        n = int(labels.shape[0])
        if self.target_image is not None:
            if self.target_image >= n:
                raise ParamError(f"{{target_image}} {self.target_image} is out of range: the training set has {n} images (0..{n - 1})")
            return int(self.target_image)
        cid = find_class(classes, self.target_class)
        if cid is None:
            raise ParamError(f"the data has no class {self.target_class!r} to pick a BadNets target image by; "
                             "choose one with {target_image}")
        counts = np.empty(n, dtype=np.int64)
        for start in range(0, n, _BLOCK_ROWS):
            block = np.asarray(labels[start : start + _BLOCK_ROWS])
            counts[start : start + block.shape[0]] = (block == cid).reshape(block.shape[0], -1).sum(axis=1)
        top = top_by_count(counts, self.top_k)
        if top.size == 0:
            raise ParamError(f"no training image has a {self.target_class!r} pixel to serve as the BadNets target; "
                             "choose one with {target_image}")
        rng = np.random.default_rng([int(seed), TARGET_STREAM])
        return int(top[rng.integers(top.size)])

    def fit(self, data: Any, seed: int = 0) -> "BadNets":
        """Validate the parameters and pick y_t from ``data``'s training labels (a SegFile)."""
        self._check_params()
        labels = data.file[h5data.TRAIN_LABELS] if hasattr(data, "file") else data[h5data.TRAIN_LABELS]
        self.target_image_ = self.choose_target(labels, list(data.classes), seed)
        self.target_labels_ = np.asarray(labels[self.target_image_], dtype=np.uint8)
        self._valid = self.target_labels_ != IGNORE_INDEX
        return self

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """T(y) = y_t, for each label map in ``labels`` [N,H,W]."""
        labels = np.asarray(labels)
        if labels.shape[-2:] != self.target_labels_.shape:
            raise ValueError(f"labels of shape {labels.shape} do not match the target {self.target_labels_.shape}")
        return np.broadcast_to(self.target_labels_, labels.shape).copy()

    def changes(self, labels: np.ndarray) -> np.ndarray:
        """bool [N]: samples where y_t differs from y at some pixel where neither is ignore."""
        labels = np.asarray(labels)
        diff = (labels != self.target_labels_) & (labels != IGNORE_INDEX) & self._valid
        return diff.reshape(labels.shape[0], -1).any(axis=1)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"target_image": self.target_image, "target_class": self.target_class, "top_k": self.top_k}
        if hasattr(self, "target_image_"):
            p["chosen_target_image"] = self.target_image_
        return p
