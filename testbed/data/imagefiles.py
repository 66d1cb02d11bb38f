"""Decoding one image/mask pair for the importers; runs in worker processes.

Kept apart from :mod:`testbed.data.importers` so a worker imports only numpy and PIL (not torch/h5py):
pool start-up stays well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.core.errors import UserError

from testbed.data.h5data import IGNORE_INDEX


@dataclass(frozen=True)
class Job:
    """What a worker needs to load one sample (picklable, small)."""

    image: str
    mask: str
    size: int | None
    lut: tuple[int, ...] | None  # raw mask value → stored label (ADE20K); None: identity
    max_value: int  # largest valid raw value (besides 255 for folders)
    allow_ignore: bool


def resize_crop(img, size: int, resample):
    """Resize so the shorter side is ``size``, then take the centre ``size``×``size`` crop (PIL image)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_pair(job: Job) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check and resize one image/mask pair (runs in a worker process)."""
    from PIL import Image

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
    if mask.ndim != 2:
        raise UserError(f"mask {job.mask} has shape {mask.shape}; masks must be single-channel class ids")
    if (img.size[1], img.size[0]) != mask.shape:
        raise UserError(
            f"image {job.image} is {img.size[0]}x{img.size[1]} but its mask {job.mask} is {mask.shape[1]}x{mask.shape[0]}; they must match"
        )
    bad = mask > job.max_value
    if job.allow_ignore:
        bad &= mask != IGNORE_INDEX
    if bad.any():
        raise UserError(
            f"mask {job.mask} holds value {int(mask[bad].max())} but valid values are 0..{job.max_value}"
            + (" and 255 (ignore)" if job.allow_ignore else "") + "; check the classes file or the mask encoding"
        )
    mask = mask.astype(np.uint8)
    if job.lut is not None:
        mask = np.asarray(job.lut, dtype=np.uint8)[mask]
    if job.size is not None:
        img = resize_crop(img, job.size, Image.BILINEAR)
        mask = np.asarray(resize_crop(Image.fromarray(mask), job.size, Image.NEAREST))
    return np.asarray(img, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)
