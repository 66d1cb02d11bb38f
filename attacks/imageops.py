"""Pixel operations shared by the drawn triggers: the blend G(x) = (1−α)x + αt, image files, resizing.

One copy of the blend so that the line, the blended pattern and the pasted patches round the same way:
computed in float64 and rounded half up, ``floor((1−α)·x + α·t + 0.5)``, which never leaves [0, 255].
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from testbed.core.errors import ParamError
from testbed.core.paramtypes import is_num

MAX_IMAGE_BYTES = 64 << 20  # a trigger or patch image is small; a larger file is refused after this many bytes + 1


def as_images(images: Any) -> np.ndarray:
    """``images`` as a uint8 array ``[N,H,W,3]`` or ``[H,W,3]`` (what G takes); anything else is a ValueError."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images [N,H,W,3] or [H,W,3], got {images.dtype} {images.shape}")
    return images


def blend(x: np.ndarray, t: Any, alpha: Any) -> np.ndarray:
    """``floor((1−alpha)·x + alpha·t + 0.5)`` as uint8; ``alpha`` is a number or an array broadcast like ``x``."""
    x64 = np.asarray(x, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    out = np.floor((1.0 - a) * x64 + a * np.asarray(t, dtype=np.float64) + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def check_alpha(value: Any, where: str) -> float:
    """A blend weight α in (0, 1]; ``where`` names it in the error (``{alpha}`` or ``{trigger} blended:A``)."""
    ok = is_num(value) and 0 < value <= 1
    if not ok:
        raise ParamError(f"{where} must be a blend weight in (0, 1] (1 replaces the pixels, smaller is fainter), "
                         f"got {value!r}")
    return float(value)


def check_image_path(path: Any, param: str) -> Path:
    """``path`` as a Path to an existing file (not read); else a :class:`ParamError` naming ``param``."""
    p = Path(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    if p is None or not str(path).strip():
        raise ParamError(f"{{{param}}} must be the path of an image file (PNG, JPEG, ...), got {path!r}")
    if not p.is_file():
        raise ParamError(f"{{{param}}} {p}: no such file; give the path of an image file (PNG, JPEG, ...)")
    return p


def read_image(path: Any, param: str) -> tuple[np.ndarray, str]:
    """An image file as uint8 ``[h, w, 3]`` (RGB) or ``[h, w, 4]`` (RGBA: its alpha is a blend mask), and the
    SHA-256 of its bytes, from one read of the file (the recorded hash is that of the pixels used).

    A path that is missing or not an image is a :class:`ParamError` naming ``param`` (e.g. ``{patch}``).
    """
    p = check_image_path(path, param)
    try:
        with open(p, "rb") as f:  # the bound applies to what is read, not to a size looked up before reading
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise ParamError(f"{{{param}}} {p} cannot be read ({e.strerror})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ParamError(f"{{{param}}} {p} is more than {MAX_IMAGE_BYTES:,} bytes, more than a trigger image "
                         "needs; give a small PNG or JPEG")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = "RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB"
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ParamError(f"{{{param}}} {p} is not an image file PIL can read ({type(e).__name__}); "
                         "give a PNG or JPEG") from None
    return np.ascontiguousarray(arr), hashlib.sha256(data).hexdigest()


def read_kept(owner: Any, path: Any, param: str) -> tuple[np.ndarray, str]:
    """:func:`read_image`, kept on ``owner`` (a trigger or an attack, in ``owner._read``): its check, fit and
    record share one read of the file; it is read anew only when ``path`` has changed since."""
    kept = owner.__dict__.setdefault("_read", {})
    if param not in kept or kept[param][0] != path:
        kept[param] = (path, *read_image(path, param))
    return kept[param][1], kept[param][2]


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 ``[h, w, C]`` resized to ``size = (H, W)`` with PIL's bilinear filter (unchanged if already that size)."""
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image.copy()
    mode = "RGBA" if image.shape[2] == 4 else "RGB"
    return np.asarray(Image.fromarray(image, mode).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 ``[h,w,3]``, blend weight float ``[h,w,1]`` in [0,1] or None for an opaque image)."""
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[..., :3]), image[..., 3:4].astype(np.float64) / 255.0
    return image, None
