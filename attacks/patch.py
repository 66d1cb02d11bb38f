"""What IBA and the object-bound attack share: a square patch trigger placed by the labels, and its geometry.

Both attacks relabel one victim class to a target class and paste a small square patch whose *position*
depends on each sample's label map (IBA: inside one non-victim region; object-bound: inside one victim
instance).  The placement rules are written with two array operations so that they are exact and fast:

- :func:`constant_windows`: the centres whose ``size×size`` footprint lies inside the image and covers a
  single value of a map (one class, or one connected component) — a minimum and a maximum filter;
- :func:`chessboard_distance`: each pixel's distance to the nearest victim pixel, max(|Δrow|, |Δcol|)
  (the distance of the IBA reference code, whose masks grow by square steps).

The patch's footprint for centre ``(r, c)`` is rows ``r − size//2 … r − size//2 + size − 1`` (same for
columns), scipy's window convention; for an odd size the centre is the middle pixel.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from testbed.attacks.base import Attack, Param, Trigger
from testbed.attacks.imageops import blend, read_kept, resize, split_alpha
from testbed.core.errors import ParamError, did_you_mean
from testbed.core.paramtypes import is_int
from testbed.data.h5data import find_class

PATTERN_STREAM = 7  # seed stream of the procedural patch (see docs/attacks.md for every stream)
SPLIT_CODE = {"train": 0, "test": 1}

VICTIM_PARAMS = {
    "source": Param("the victim class", metavar="CLASS"),
    "target": Param("the target class", metavar="CLASS"),
}
PATCH_PARAMS = {
    "patch_size": Param("side of the square patch in px (default: the odd side nearest "
                        "sqrt(0.0075*H*W), about 0.75 percent of the image: 5 px at 64x64)", type=int, metavar="PX"),
    "patch": Param("an image file as the patch, resized to the patch size; an alpha channel "
                   "blends it (default: a seeded random pattern of saturated colours)", metavar="FILE"),
}


def default_patch_size(image_size: Sequence[int]) -> int:
    """The odd side nearest √(0.0075·H·W) (≈0.75% of the image, the reference's 55 px at 512×1024), ≥ 3."""
    side = math.sqrt(0.0075 * int(image_size[0]) * int(image_size[1]))
    odd = 2 * int(math.floor((side - 1) / 2 + 0.5)) + 1
    return max(3, odd)


def procedural_patch(size: int, seed: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: every pixel one of the 8 saturated colours (each channel 0 or 255), by seed."""
    rng = np.random.default_rng([int(seed), PATTERN_STREAM])
    return (rng.integers(0, 2, size=(size, size, 3)) * 255).astype(np.uint8)


def constant_windows(maps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ok bool ``[N,H,W]``, value ``[N,H,W]``): centres whose ``size×size`` footprint lies in the image and
    holds one value of ``maps`` (``[N,H,W]`` integers below 2**31), and that value."""
    m = np.asarray(maps).astype(np.int64)
    win = (1, size, size)
    hi = ndi.maximum_filter(m, size=win, mode="constant", cval=-1)  # a footprint leaving the image sees -1
    lo = ndi.minimum_filter(m, size=win, mode="constant", cval=-1)
    return (hi == lo) & (lo >= 0), lo


def chessboard_distance(victim: np.ndarray) -> np.ndarray:
    """int ``[H,W]``: max(|Δrow|, |Δcol|) to the nearest True pixel of ``victim`` (which must hold one)."""
    return ndi.distance_transform_cdt(~np.asarray(victim, dtype=bool), metric="chessboard").astype(np.int64)


def footprint(centre: Sequence[int], size: int) -> tuple[slice, slice]:
    r0, c0 = int(centre[0]) - size // 2, int(centre[1]) - size // 2
    return slice(r0, r0 + size), slice(c0, c0 + size)


def draw(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int]:
    """A pixel ``(row, col)`` drawn uniformly among the True pixels of ``mask`` [H,W]."""
    flat = np.flatnonzero(mask)
    k = int(flat[rng.integers(flat.size)])
    return divmod(k, mask.shape[1])


def sample_rng(seed: int, stream: int, split: str, index: Any) -> np.random.Generator:
    """The generator of one sample: independent of how the poisoner batches rows."""
    return np.random.default_rng([int(seed), stream, SPLIT_CODE[split], int(index)])


class PatchTrigger(Trigger):
    """A square patch pasted at a centre chosen per sample by the attack (so ``apply`` alone is not G).

    ``pattern`` is uint8 ``[size, size, 3]``; ``weight`` is None (opaque) or float ``[size, size, 1]`` in
    [0, 1] from an image file's alpha channel, blended with :func:`testbed.attacks.imageops.blend`.
    """

    name = "patch"

    def __init__(self, pattern: np.ndarray, weight: np.ndarray | None, source: dict[str, Any]) -> None:
        self.pattern, self.weight, self.source = pattern, weight, source

    @property
    def size(self) -> int:
        """The patch's side in pixels."""
        return int(self.pattern.shape[0])

    def check(self, image_size: Sequence[int]) -> None:
        if self.size > min(int(image_size[0]), int(image_size[1])):
            raise ParamError(f"{{patch_size}} {self.size} px is larger than the {image_size[0]}x{image_size[1]} image; "
                             "choose a smaller patch")

    def apply(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the patch is placed by each sample's labels: use the attack's poison_samples")

    def paste(self, image: np.ndarray, centre: Sequence[int]) -> np.ndarray:
        """A copy of uint8 ``image`` [H,W,3] with the patch at ``centre`` (its footprint must lie inside)."""
        out = np.array(image, copy=True)
        rows, cols = footprint(centre, self.size)
        out[rows, cols] = self.pattern if self.weight is None else blend(out[rows, cols], self.pattern, self.weight)
        return out

    @property
    def spec(self) -> str:
        return "patch"

    def describe(self, image_size: Sequence[int] | None = None) -> dict[str, Any]:
        return {"spec": "patch", "type": "patch", "size": self.size, **self.source}


class VictimPatchAttack(Attack):
    """Base of IBA and object-bound: ``source`` (victim class) → ``target`` with a patch trigger.

    ``fit`` validates the classes and the patch, and sets ``source_id_``, ``target_id_``, ``lut_`` (T as a
    256-entry table), ``image_size_``, ``seed_`` and ``trigger_`` (a :class:`PatchTrigger`).
    """

    own_trigger = True
    requires_text = "a victim-class pixel"

    def _check_pair(self, classes: list[str]) -> None:
        for key in ("source", "target"):
            value = getattr(self, key)
            if value is None:
                raise ParamError(f"{self.name} needs {{source}} CLASS (the victim) and {{target}} CLASS, e.g. "
                                 "{source} car {target} road")
            if find_class(classes, value) is None:
                raise ParamError(f"unknown class {value!r} in {{{key}}}{did_you_mean(value, classes)}; the data has: "
                                 f"{', '.join(classes)}")
        if find_class(classes, self.source) == find_class(classes, self.target):
            raise ParamError(f"{{source}} and {{target}} are both {self.source!r}; choose a target that differs from the victim")
        s = self.patch_size
        if s is not None and not is_int(s, 1):
            raise ParamError(f"{{patch_size}} must be a positive number of pixels, got {s!r}")
        if self.patch is not None:
            read_kept(self, self.patch, "patch")

    def _fit_patch(self, data: Any, seed: int) -> None:
        """Resolve classes, size and pattern against ``data`` (a SegFile, or anything with classes/image_size)."""
        classes = list(data.classes)
        self.check_params(classes)
        self.source_id_, self.target_id_ = find_class(classes, self.source), find_class(classes, self.target)
        self.lut_ = np.arange(256, dtype=np.uint8)
        self.lut_[self.source_id_] = self.target_id_
        self.image_size_ = (int(data.image_size[0]), int(data.image_size[1]))
        self.seed_ = int(seed)
        size = int(self.patch_size) if self.patch_size is not None else default_patch_size(self.image_size_)
        if self.patch is None:
            pattern, weight = procedural_patch(size, seed), None
            source = {"pattern": "procedural", "pattern_seed": int(seed)}
        else:
            image, sha = read_kept(self, self.patch, "patch")
            pattern, weight = split_alpha(resize(image, (size, size)))
            source = {"pattern": "file", "file": str(self.patch), "file_sha256": sha}
        self.trigger_ = PatchTrigger(pattern, weight, source)
        self.trigger_.check(self.image_size_)

    def victim_mask(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels) == self.source_id_

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """T: every victim pixel becomes the target (ignore stays ignore)."""
        return self.lut_[np.asarray(labels, dtype=np.uint8)]

    def _base_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"source": self.source, "target": self.target, "patch_size": self.patch_size,
                             "patch": None if self.patch is None else str(self.patch)}
        if hasattr(self, "trigger_"):
            p["patch_size"] = self.trigger_.size
        return p
