"""What every importer shares: finding image/mask pairs, decoding them in a pool, writing the file.

Decoding JPEG/PNG is the slow part, so it runs in a process pool; results come back in order and are
streamed into :class:`testbed.data.h5data.DatasetWriter` a sample at a time, so a 20k-image set never sits in
memory.  Every problem a user can cause (missing folder, image without mask, bad mask value) is found
before or while reading and reported as one :class:`UserError` line; no partial file is left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from testbed.core import progress
from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.imagefiles import Job, LabelRule, Resize, load_pair

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ORDER = ("train", "val", "test")
Pairs = list[tuple[Path, Path]]


@dataclass(frozen=True)
class ImportOptions:
    """Settings every importer takes: output size, a per-split ``limit`` (the first N of each split, in the
    dataset's own order), decoding processes (None: CPU count, at most 8) and HDF5 compression."""

    resize: Resize = field(default_factory=Resize)
    limit: int | None = None
    workers: int | None = None
    compression: str | None = None


@dataclass(frozen=True)
class Plan:
    """What one importer found: the pairs per split, the classes, how to read labels, and provenance."""

    splits: dict[str, Pairs]
    classes: list[str]
    labels: LabelRule
    source: dict
    palette: list[list[int]] | None = None


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


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def pair(images: Sequence[Path], mask_dir: Path, mask_exts: Sequence[str]) -> Pairs:
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


def load_checked(job: Job) -> tuple[np.ndarray, np.ndarray]:
    """``load_pair`` with PIL's decompression-bomb limit as a clean error (it runs in a worker process).

    A small PNG can declare billions of pixels; PIL refuses past ``Image.MAX_IMAGE_PIXELS`` (a warning up to twice
    that, an error beyond).  Both become one line naming the file instead of a traceback or an exhausted memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_pair(job)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{job.image} or its mask {job.mask} declares too many pixels ({e}); PIL refuses it as a "
                        "possible decompression bomb: remove or shrink the image") from None


def run_jobs(jobs: Sequence[Job], workers: int, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield loaded samples in job order, from a process pool when workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        for job in progress.bar(jobs, total=len(jobs), desc=desc):
            yield load_checked(job)
        return
    # fork: workers start in milliseconds and only run PIL + numpy (no threads, no HDF5 handles touched)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    with ctx.Pool(workers) as pool:
        it = pool.imap(load_checked, jobs, chunksize=chunk)
        yield from progress.bar(it, total=len(jobs), desc=desc)


def check_options(options: ImportOptions) -> int:
    """Validate the shared options (errors name the flag); returns the number of decoding processes."""
    r = options.resize
    if r.size is not None and (len(r.size) != 2 or min(r.size) < 8):
        raise UserError(f"--size takes H W, each at least 8 pixels; got {' '.join(map(str, r.size))}")
    if r.short_side is not None and r.short_side < 8:
        raise UserError(f"--short-side must be at least 8 pixels, got {r.short_side}")
    if r.size is not None and r.short_side is not None:
        raise UserError("give --size H W or --short-side N, not both")
    if r.crop and r.short_side is None:
        raise UserError("--crop needs --short-side N (it centre-crops to N×N after the resize)")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit must be at least 1, got {options.limit}")
    if options.workers is None:
        return max(1, min(8, os.cpu_count() or 1))
    if int(options.workers) < 1:
        raise UserError(f"--workers must be >= 1, got {options.workers}")
    return int(options.workers)


def _jobs(plan: Plan, options: ImportOptions) -> dict[str, list[Job]]:
    if sum(len(p) for p in plan.splits.values()) == 0:
        raise UserError(f"no images found for {plan.source.get('importer')} import of {plan.source.get('root')}")
    for split in ("train", "test"):
        if not plan.splits.get(split):
            raise UserError(f"the {split} split has no images; both train and test need at least one")
    splits = {s: plan.splits[s][: options.limit] for s in SPLIT_ORDER if plan.splits.get(s)}
    return {s: [Job(str(i), str(m), options.resize, plan.labels) for i, m in pairs] for s, pairs in splits.items()}


def write(out: str | os.PathLike, plan: Plan, options: ImportOptions) -> Path:
    """Decode every pair of ``plan`` and write the dataset file atomically (train, optional val, test)."""
    workers = check_options(options)
    jobs = _jobs(plan, options)
    first_img, _ = load_checked(jobs["train"][0])
    h, w = first_img.shape[:2]
    counts = {f"n_{s}": len(j) for s, j in jobs.items()}
    source = dict(plan.source, **options.resize.describe(), **counts, limit=options.limit)
    attrs = {"palette": plan.palette} if plan.palette is not None else None
    with h5data.DatasetWriter(out, plan.classes, source=source, image_size=(h, w), compression=options.compression,
                              attrs=attrs) as wr:
        for split, split_jobs in jobs.items():
            images = wr.create(f"{split}/images", (len(split_jobs), h, w, 3), np.uint8)
            labels = wr.create(f"{split}/labels", (len(split_jobs), h, w), np.uint8)
            for i, (img, mask) in enumerate(run_jobs(split_jobs, workers, desc=f"import {split}")):
                if img.shape[:2] != (h, w):
                    raise UserError(f"{split_jobs[i].image} is {img.shape[1]}x{img.shape[0]}, other images are {w}x{h}; "
                                    "pass --size H W to resize all to one size")
                images[i] = img
                labels[i] = mask
    return Path(out)


def hold_out(splits: dict[str, Pairs], fraction: float, seed: int) -> tuple[dict[str, Pairs], dict]:
    """Move a seeded ``fraction`` of the training pairs to a ``val`` split (for datasets whose own validation
    split serves as the test split); returns the splits and what to record in ``source``."""
    if not fraction:
        return splits, {}
    if not 0 < float(fraction) < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    train = splits["train"]
    n_val = min(len(train) - 1, max(1, round(len(train) * float(fraction))))
    if n_val < 1:
        raise UserError(f"--val-fraction needs at least two training images, the train split has {len(train)}")
    held = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
    out = dict(splits, train=[p for i, p in enumerate(train) if i not in held],
               val=[p for i, p in enumerate(train) if i in held])
    return out, {"val_fraction": float(fraction), "val_seed": int(seed)}


def square(size: int | None) -> Resize:
    """The ade20k/folder ``size`` argument of old: shorter side to ``size``, centre crop to ``size``×``size``."""
    if size is not None and int(size) < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")
    return Resize() if size is None else Resize(short_side=int(size), crop=True)
