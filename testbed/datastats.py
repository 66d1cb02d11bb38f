"""Class statistics of a dataset split: pixel shares, image shares, co-occurrence.

Why they matter here: a semantic trigger poisons every image that contains its class, so the share of
images containing a class *is* the poison rate a semantic attack will reach, and co-occurrence says
whether a trigger class and a source class meet often enough for FGBA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed import progress
from testbed.h5data import SegFile

_BLOCK_PIXELS = 1 << 24  # labels read per block (16 MB)


@dataclass
class SplitStats:
    """Statistics of one label array; shares are fractions in [0,1]."""

    num_images: int
    pixel_counts: np.ndarray  # int64 [K]: pixels of each class
    ignore_pixels: int
    total_pixels: int
    presence: np.ndarray  # int64 [K]: images containing each class
    cooccurrence: np.ndarray  # int64 [K,K]: images containing both i and j (diagonal = presence)

    @property
    def pixel_share(self) -> np.ndarray:
        return self.pixel_counts / max(1, self.total_pixels)

    @property
    def image_share(self) -> np.ndarray:
        return self.presence / max(1, self.num_images)

    @property
    def cooccurrence_share(self) -> np.ndarray:
        return self.cooccurrence / max(1, self.num_images)

    def top_pairs(self, classes: list[str], n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` class pairs (i < j) that share the most images, most frequent first."""
        k = len(classes)
        iu, ju = np.triu_indices(k, 1)
        share = self.cooccurrence_share[iu, ju]
        order = np.lexsort((ju, iu, -share))[:n]  # stable: ties by class id
        return [(classes[iu[o]], classes[ju[o]], float(share[o])) for o in order if share[o] > 0]

    def to_dict(self, classes: list[str]) -> dict:
        return {
            "num_images": self.num_images,
            "pixel_share": {c: float(s) for c, s in zip(classes, self.pixel_share)},
            "ignore_share": self.ignore_pixels / max(1, self.total_pixels),
            "image_share": {c: float(s) for c, s in zip(classes, self.image_share)},
            "cooccurrence": {
                "classes": list(classes),
                "share": [[float(v) for v in row] for row in self.cooccurrence_share],
            },
            "top_pairs": [{"classes": [a, b], "share": s} for a, b, s in self.top_pairs(classes)],
        }


def label_stats(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> SplitStats:
    """Statistics of an in-memory label array uint8 [N,H,W]."""
    acc = _Accumulator(num_classes, ignore_index)
    acc.add(np.asarray(labels))
    return acc.result()


def split_stats(f: SegFile, name: str = "train/labels", show_progress: bool = True) -> SplitStats:
    """Statistics of label array ``name`` of an open dataset, read in blocks (bounded memory)."""
    ds = f.file[name]
    acc = _Accumulator(f.num_classes, f.ignore_index)
    per = max(1, _BLOCK_PIXELS // max(1, int(np.prod(ds.shape[1:]))))
    starts = range(0, ds.shape[0], per)
    for start in progress.bar(starts, total=len(starts), desc=f"stats {name}") if show_progress else starts:
        acc.add(ds[start : start + per])
    return acc.result()


class _Accumulator:
    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.k, self.ignore = num_classes, ignore_index
        self.n = 0
        self.counts = np.zeros(256, dtype=np.int64)
        self.presence = np.zeros(num_classes, dtype=np.int64)
        self.co = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.total = 0

    def add(self, block: np.ndarray) -> None:
        b = block.shape[0]
        if b == 0:
            return
        flat = block.reshape(b, -1).astype(np.int64)
        per_image = np.bincount((flat + 256 * np.arange(b)[:, None]).ravel(), minlength=256 * b).reshape(b, 256)
        self.counts += per_image.sum(0)
        present = (per_image[:, : self.k] > 0).astype(np.int64)
        self.presence += present.sum(0)
        self.co += present.T @ present
        self.n += b
        self.total += flat.size

    def result(self) -> SplitStats:
        return SplitStats(
            num_images=self.n, pixel_counts=self.counts[: self.k].copy(), ignore_pixels=int(self.counts[self.ignore]),
            total_pixels=self.total, presence=self.presence, cooccurrence=self.co,
        )
