"""Class statistics of a dataset split: pixel shares, image shares, co-occurrence.

Why they matter here: a semantic trigger poisons every image that contains its class, so the share of
images containing a class *is* the poison rate a semantic attack will reach, and co-occurrence says
whether a trigger class and a source class meet often enough for FGBA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import correlate1d

from testbed.data import h5data
from testbed.core import progress
from testbed.data.h5data import SegFile, read_rows

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


def split_stats(f: SegFile, name: str = h5data.TRAIN_LABELS, show_progress: bool = True) -> SplitStats:
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


# -- trigger fidelity: how visible the trigger is --------------------------------------------------------
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. (2004), the usual constants
FIDELITY_LIMIT = 256  # poisoned samples compared (the first ones): enough for a mean, cheap on large images


def psnr(clean: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images ``[N,H,W,C]`` (peak 255); ``inf`` where an image is unchanged."""
    diff = clean.astype(np.float64) - poisoned.astype(np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def ssim(clean: np.ndarray, poisoned: np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 images ``[N,H,W,C]`` (Wang et al. 2004): an 11×11 Gaussian window (σ 1.5),
    K1 0.01, K2 0.03, data range 255, averaged over channels and pixels, the border mirrored (as torchmetrics
    computes it, so numbers compare with other tools that use it)."""
    x = np.moveaxis(np.asarray(clean, dtype=np.float64), -1, 1)  # [N,C,H,W]
    y = np.moveaxis(np.asarray(poisoned, dtype=np.float64), -1, 1)
    t = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    g /= g.sum()

    def mean(a: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(a, g, axis=-1, mode="mirror"), g, axis=-2, mode="mirror")

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(s.shape[0], -1).mean(axis=1)


def trigger_fidelity(f: SegFile, limit: int = FIDELITY_LIMIT) -> dict | None:
    """PSNR/SSIM of the first ``limit`` poisoned training images against their clean originals.

    None for a file without poisoned samples.  ``psnr_db`` averages the images the trigger changed (an
    unchanged image has infinite PSNR: a semantic trigger changes none, so its PSNR is None and SSIM 1).
    """
    if h5data.ORIGINAL_IMAGES not in f.file or h5data.POISON_INDEX not in f.file:
        return None
    index = np.asarray(f.file[h5data.POISON_INDEX][:limit], dtype=np.int64)
    if index.size == 0:
        return None
    clean = np.asarray(f.file[h5data.ORIGINAL_IMAGES][: index.size])
    poisoned = read_rows(f.file[h5data.TRAIN_IMAGES], index)
    db = psnr(clean, poisoned)
    changed = np.isfinite(db)
    s = ssim(clean, poisoned)
    return {
        "images": int(index.size),
        "changed": int(changed.sum()),
        "psnr_db": float(db[changed].mean()) if changed.any() else None,
        "psnr_db_min": float(db[changed].min()) if changed.any() else None,
        "ssim": float(s.mean()),
        "ssim_min": float(s.min()),
    }


def fidelity_text(d: dict) -> str:
    """One line for `testbed data info`: the trigger's PSNR/SSIM against the clean images."""
    if not d["changed"]:
        return f"images unchanged on {d['images']} poisoned samples (PSNR infinite, SSIM 1)"
    return (f"PSNR {d['psnr_db']:.1f} dB (min {d['psnr_db_min']:.1f}), SSIM {d['ssim']:.4f} (min {d['ssim_min']:.4f}) "
            f"vs the clean images, {d['images']} poisoned samples")
