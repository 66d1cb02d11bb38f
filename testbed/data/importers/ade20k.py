"""ADE20K SceneParsing (``ADEChallengeData2016/``): training → train, validation → test."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import ImportOptions, Plan, images_in, pair, square, write

ADE20K_NUM_CLASSES = 150
SPLIT_DIRS = {"train": "training", "test": "validation"}


def ade20k_classes() -> list[str]:
    """The 150 ADE20K SceneParsing class names, 0-based (wall=0, ..., flag=149), shipped with the package."""
    text = importlib.resources.files("testbed.data").joinpath("ade20k_classes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise UserError(f"ADE20K root {root} does not exist; point it at the ADEChallengeData2016 folder")
    if not (root / "images").is_dir():
        raise UserError(f"{root} has no images/ folder; point it at ADEChallengeData2016 (images/ and annotations/)")
    if not (root / "annotations").is_dir():
        raise UserError(f"{root} has no annotations/ folder; ADE20K needs annotations/training and annotations/validation")


def ade20k_plan(root: Path) -> Plan:
    """The pairs and label mapping of an ADE20K root (raw 0 → 255, raw v → v−1)."""
    _check_root(root)
    splits = {}
    for split, sub in SPLIT_DIRS.items():
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        if not img_dir.is_dir():
            raise UserError(f"{img_dir} is missing; ADE20K has images/training and images/validation")
        if not ann_dir.is_dir():
            raise UserError(f"{ann_dir} is missing; ADE20K has annotations/training and annotations/validation")
        splits[split] = pair(images_in(img_dir), ann_dir, (".png",))
    lut = np.arange(256, dtype=np.int64) - 1
    lut = np.where(lut < 0, h5data.IGNORE_INDEX, lut)
    rule = LabelRule(max_value=ADE20K_NUM_CLASSES, lut=tuple(int(v) for v in lut))
    source = {"importer": "ade20k", "root": root.resolve().name, "test_split": "validation"}
    return Plan(splits, ade20k_classes(), rule, source)


def import_ade20k(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = 512,
    workers: int | None = None,
    compression: str | None = None,
    options: ImportOptions | None = None,
) -> Path:
    """Import ADE20K SceneParsing (``ADEChallengeData2016/``): training → train, validation → test.

    Raw mask value 0 ("other") becomes 255 (ignore) and v becomes v−1, so ids follow
    ``ade20k_classes()``.  Without ``options``, images are resized (shorter side = ``size``, bilinear; masks
    nearest) and centre-cropped to ``size``×``size``; ``options`` (resize, limit, workers, compression) replaces
    ``size``, ``workers`` and ``compression``.
    """
    if options is None:
        options = ImportOptions(resize=square(size), workers=workers, compression=compression)
    plan = ade20k_plan(Path(root))
    if options.resize.crop:
        plan.source["size"] = options.resize.short_side
    return write(out, plan, options)
