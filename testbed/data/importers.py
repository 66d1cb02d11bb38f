"""Importers: real datasets on disk → one dataset file (docs/data-format.md).

Decoding JPEG/PNG is the slow part, so it runs in a process pool; results come back in order and are
streamed into :class:`testbed.data.h5data.DatasetWriter` a sample at a time, so a 20k-image set never sits in
memory.  Every problem a user can cause (missing folder, image without mask, bad mask value) is found
before or while reading and reported as one :class:`UserError` line; no partial file is left behind.
"""

from __future__ import annotations

import importlib.resources
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from testbed.data import h5data
from testbed.core import progress
from testbed.core.errors import UserError
from testbed.data.imagefiles import Job as _Job
from testbed.data.imagefiles import load_pair as _load

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ADE20K_NUM_CLASSES = 150
_SPLIT_DIRS = {"ade20k": {"train": "training", "test": "validation"}, "folder": {"train": "train", "test": "test"}}


def ade20k_classes() -> list[str]:
    """The 150 ADE20K SceneParsing class names, 0-based (wall=0, ..., flag=149), shipped with the package."""
    text = importlib.resources.files("testbed.data").joinpath("ade20k_classes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line in id order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classes file {path} not found; give a text file with one class name per line (id order)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise UserError(f"classes file {path} has no class names; write one name per line in id order")
    if len(names) > 255:
        raise UserError(f"classes file {path} lists {len(names)} classes; at most 255 fit (255 is the ignore index)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"classes file {path} repeats class name(s) {', '.join(dupes)}; names must be unique")
    return names


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pair(images: Sequence[Path], mask_dir: Path, mask_exts: Sequence[str]) -> list[tuple[Path, Path]]:
    """Match each image to the mask with the same stem; an image without a mask is a user error."""
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in mask_exts:
                masks.setdefault(p.stem, p)
    pairs = []
    for img in images:
        mask = masks.get(img.stem)
        if mask is None:
            raise UserError(f"image {img} has no mask {mask_dir / (img.stem + mask_exts[0])}; add the mask or remove the image")
        pairs.append((img, mask))
    return pairs


def _load_checked(job: _Job) -> tuple[np.ndarray, np.ndarray]:
    """``load_pair`` with PIL's decompression-bomb limit as a clean error (it runs in a worker process).

    A small PNG can declare billions of pixels; PIL refuses past ``Image.MAX_IMAGE_PIXELS`` (a warning up to twice
    that, an error beyond).  Both become one line naming the file instead of a traceback or an exhausted memory.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _load(job)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{job.image} or its mask {job.mask} declares too many pixels ({e}); PIL refuses it as a "
                        "possible decompression bomb: remove or shrink the image") from None


def _run(jobs: Sequence[_Job], workers: int, desc: str):
    """Yield loaded samples in job order, from a process pool when workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        for job in progress.bar(jobs, total=len(jobs), desc=desc):
            yield _load_checked(job)
        return
    # fork: workers start in milliseconds and only run PIL + numpy (no threads, no HDF5 handles touched)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    with ctx.Pool(workers) as pool:
        it = pool.imap(_load_checked, jobs, chunksize=chunk)
        yield from progress.bar(it, total=len(jobs), desc=desc)


def _write(
    out: str | os.PathLike,
    splits: dict[str, list[tuple[Path, Path]]],
    classes: list[str],
    *,
    size: int | None,
    lut: tuple[int, ...] | None,
    max_value: int,
    allow_ignore: bool,
    workers: int,
    compression: str | None,
    source: dict,
) -> Path:
    if sum(len(p) for p in splits.values()) == 0:
        raise UserError(f"no images found for {source.get('importer')} import of {source.get('root')}")
    for split, pairs in splits.items():
        if not pairs:
            raise UserError(f"the {split} split has no images; both train and test need at least one")
    jobs = {s: [_Job(str(i), str(m), size, lut, max_value, allow_ignore) for i, m in pairs] for s, pairs in splits.items()}
    first_img, _ = _load_checked(jobs["train"][0])
    h, w = first_img.shape[:2]
    source = dict(source, size=size, n_train=len(splits["train"]), n_test=len(splits["test"]))
    with h5data.DatasetWriter(out, classes, source=source, image_size=(h, w), compression=compression) as wr:
        for split in ("train", "test"):
            n = len(jobs[split])
            images = wr.create(f"{split}/images", (n, h, w, 3), np.uint8)
            labels = wr.create(f"{split}/labels", (n, h, w), np.uint8)
            for i, (img, mask) in enumerate(_run(jobs[split], workers, desc=f"import {split}")):
                if img.shape[:2] != (h, w):
                    raise UserError(
                        f"{jobs[split][i].image} is {img.shape[1]}x{img.shape[0]}, other images are {w}x{h}; pass --size to resize all to one size"
                    )
                images[i] = img
                labels[i] = mask
    return Path(out)


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(8, os.cpu_count() or 1))
    if int(workers) < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    return int(workers)


def _check_size(size: int | None) -> None:
    if size is not None and int(size) < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")


def import_ade20k(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 512,
    workers: int | None = None,
    compression: str | None = None,
) -> Path:
    """Import ADE20K SceneParsing (``ADEChallengeData2016/``): training → train, validation → test.

    Raw mask value 0 ("other") becomes 255 (ignore) and v becomes v−1, so ids follow
    ``ade20k_classes()``.  Images are resized (shorter side = ``size``, bilinear; masks nearest) and
    centre-cropped to ``size``×``size``.
    """
    root = Path(root)
    _check_size(size)
    workers = _check_workers(workers)
    if not root.is_dir():
        raise UserError(f"ADE20K root {root} does not exist; point it at the ADEChallengeData2016 folder")
    if not (root / "images").is_dir():
        raise UserError(f"{root} has no images/ folder; point it at ADEChallengeData2016 (images/ and annotations/)")
    if not (root / "annotations").is_dir():
        raise UserError(f"{root} has no annotations/ folder; ADE20K needs annotations/training and annotations/validation")
    splits: dict[str, list[tuple[Path, Path]]] = {}
    for split, sub in _SPLIT_DIRS["ade20k"].items():
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        if not img_dir.is_dir():
            raise UserError(f"{img_dir} is missing; ADE20K has images/training and images/validation")
        if not ann_dir.is_dir():
            raise UserError(f"{ann_dir} is missing; ADE20K has annotations/training and annotations/validation")
        splits[split] = _pair(_images_in(img_dir), ann_dir, (".png",))
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = h5data.IGNORE_INDEX
    lut = np.where(lut < 0, h5data.IGNORE_INDEX, lut)
    return _write(
        out, splits, ade20k_classes(), size=size, lut=tuple(int(v) for v in lut), max_value=ADE20K_NUM_CLASSES,
        allow_ignore=False, workers=workers, compression=compression,
        source={"importer": "ade20k", "root": root.resolve().name},
    )


def import_folder(
    root: str | os.PathLike,
    classes_file: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
    compression: str | None = None,
) -> Path:
    """Import ``ROOT/images`` + ``ROOT/masks`` pairs matched by file stem; masks hold class ids, 255 = ignore.

    With ``images/train`` and ``images/test`` (and the same under ``masks/``) those are the splits;
    otherwise a seeded ``test_fraction`` of the pairs becomes the test split.  Without ``size`` all
    images must already share one size; with it they are resized and centre-cropped as for ADE20K.
    """
    root = Path(root)
    _check_size(size)
    workers = _check_workers(workers)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    img_root, mask_root = root / "images", root / "masks"
    if not img_root.is_dir():
        raise UserError(f"{root} has no images/ folder; expected ROOT/images and ROOT/masks")
    if not mask_root.is_dir():
        raise UserError(f"{root} has no masks/ folder; expected ROOT/images and ROOT/masks (class-id PNGs)")
    classes = read_classes_file(classes_file)
    mask_exts = (".png", ".bmp", ".tif", ".tiff")
    if (img_root / "train").is_dir() and (img_root / "test").is_dir():
        splits = {s: _pair(_images_in(img_root / s), mask_root / s, mask_exts) for s in ("train", "test")}
        split_rule: dict = {"split": "folders"}
    else:
        if not 0 < float(test_fraction) < 1:
            raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
        pairs = _pair(_images_in(img_root), mask_root, mask_exts)
        if not pairs:
            raise UserError(f"no images found in {img_root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        if len(pairs) < 2:
            raise UserError(f"{img_root} has only one image; a train/test split needs at least two")
        n_test = min(len(pairs) - 1, max(1, round(len(pairs) * float(test_fraction))))
        perm = np.random.default_rng(seed).permutation(len(pairs))
        test_idx = set(perm[:n_test].tolist())
        splits = {
            "train": [p for i, p in enumerate(pairs) if i not in test_idx],
            "test": [p for i, p in enumerate(pairs) if i in test_idx],
        }
        split_rule = {"split": "seeded", "test_fraction": float(test_fraction), "seed": int(seed)}
    return _write(
        out, splits, classes, size=size, lut=None, max_value=len(classes) - 1, allow_ignore=True, workers=workers,
        compression=compression, source={"importer": "folder", "root": root.resolve().name, **split_rule},
    )


__all__ = ["ade20k_classes", "import_ade20k", "import_folder", "read_classes_file"]
