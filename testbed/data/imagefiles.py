"""Decoding one image/mask pair for the importers; runs in worker processes.

Kept apart from :mod:`testbed.data.importers` so a worker imports only numpy and PIL (not torch/h5py):
pool start-up stays well under a second.

Resizing: images with PIL's BILINEAR filter, which widens its kernel by the reduction factor when shrinking
(antialiased, as torchvision's ``resize(..., antialias=True)``); masks with NEAREST, so every stored label is
one of the source mask's values and ignore pixels stay ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from testbed.core.errors import UserError

from testbed.data.h5data import IGNORE_INDEX


@dataclass(frozen=True)
class Resize:
    """How every sample is resized: exactly ``size`` (H, W); or the shorter side to ``short_side`` (aspect kept),
    then with ``crop`` the centre ``short_side``×``short_side``; or (all None) not at all."""

    size: tuple[int, int] | None = None
    short_side: int | None = None
    crop: bool = False

    def apply(self, img, resample):
        """Resize a PIL image."""
        if self.size is not None:
            h, w = self.size
            return img if img.size == (w, h) else img.resize((w, h), resample)
        if self.short_side is not None:
            return resize_short(img, self.short_side, self.crop, resample)
        return img

    def describe(self) -> dict:
        """The settings as they go into a file's ``source`` attribute."""
        if self.size is not None:
            return {"size": list(self.size)}
        if self.short_side is not None:
            return {"short_side": self.short_side, "crop": self.crop}
        return {"size": None}


@dataclass(frozen=True)
class LabelRule:
    """Raw mask value → stored label: values above ``max_value`` are refused (but 255 when ``allow_ignore``, and
    the ``extra`` values), then ``lut`` maps them (None: identity).  ``hint`` ends the out-of-range error."""

    max_value: int
    lut: tuple[int, ...] | None = None
    allow_ignore: bool = False
    hint: str = "check the mask encoding"
    extra: tuple[int, ...] = ()


@dataclass(frozen=True)
class Job:
    """What a worker needs to load one sample (picklable, small)."""

    image: str
    mask: str
    resize: Resize
    labels: LabelRule


def resize_short(img, size: int, crop: bool, resample):
    """Resize so the shorter side is ``size``; with ``crop`` take the centre ``size``×``size`` (PIL image)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if not crop:
        return img
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_crop(img, size: int, resample):
    """Resize so the shorter side is ``size``, then take the centre ``size``×``size`` crop (PIL image)."""
    return resize_short(img, size, True, resample)


def _decode(job: Job):
    try:
        with Image.open(job.image) as im:
            img = im.convert("RGB")
        with Image.open(job.mask) as mk:
            if mk.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"mask {job.mask} has mode {mk.mode} (colour?); masks must hold class ids in one channel")
            mask = np.asarray(mk)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read {job.image} or {job.mask} ({e}); fix or remove the pair") from None
    return img, mask


def _check_mask(job: Job, img, mask: np.ndarray) -> None:
    if mask.ndim != 2:
        raise UserError(f"mask {job.mask} has shape {mask.shape}; masks must be single-channel class ids")
    if (img.size[1], img.size[0]) != mask.shape:
        raise UserError(
            f"image {job.image} is {img.size[0]}x{img.size[1]} but its mask {job.mask} is {mask.shape[1]}x{mask.shape[0]}; they must match"
        )
    rule = job.labels
    bad = mask > rule.max_value
    if rule.allow_ignore:
        bad &= mask != IGNORE_INDEX
    if rule.extra:
        bad &= ~np.isin(mask, rule.extra)
    if bad.any():
        raise UserError(
            f"mask {job.mask} holds value {int(mask[bad].max())} but valid values are 0..{rule.max_value}"
            + (" and 255 (ignore)" if rule.allow_ignore else "")
            + (f" and {','.join(map(str, rule.extra))} (ignored)" if rule.extra else "") + f"; {rule.hint}"
        )


def load_pair(job: Job) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check, map and resize one image/mask pair (runs in a worker process)."""
    img, mask = _decode(job)
    _check_mask(job, img, mask)
    mask = mask.astype(np.uint8)
    if job.labels.lut is not None:
        mask = np.asarray(job.labels.lut, dtype=np.uint8)[mask]
    img = job.resize.apply(img, Image.BILINEAR)
    mask = np.asarray(job.resize.apply(Image.fromarray(mask), Image.NEAREST))
    return np.asarray(img, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)
