"""Any ``ROOT/images`` + ``ROOT/masks`` folder of class-id masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import IMAGE_EXTENSIONS, ImportOptions, Plan, images_in, pair, read_classes_file, square, write

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


def _seeded_split(img_root: Path, mask_root: Path, test_fraction: float, seed: int) -> tuple[dict, dict]:
    if not 0 < float(test_fraction) < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    pairs = pair(images_in(img_root), mask_root, MASK_EXTENSIONS)
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
    return splits, {"split": "seeded", "test_fraction": float(test_fraction), "seed": int(seed)}


def folder_plan(root: Path, classes_file: str | os.PathLike, test_fraction: float, seed: int) -> Plan:
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    img_root, mask_root = root / "images", root / "masks"
    if not img_root.is_dir():
        raise UserError(f"{root} has no images/ folder; expected ROOT/images and ROOT/masks")
    if not mask_root.is_dir():
        raise UserError(f"{root} has no masks/ folder; expected ROOT/images and ROOT/masks (class-id PNGs)")
    classes = read_classes_file(classes_file)
    if (img_root / "train").is_dir() and (img_root / "test").is_dir():
        splits = {s: pair(images_in(img_root / s), mask_root / s, MASK_EXTENSIONS) for s in ("train", "test")}
        split_rule: dict = {"split": "folders", "test_split": "test"}
    else:
        splits, split_rule = _seeded_split(img_root, mask_root, test_fraction, seed)
    rule = LabelRule(max_value=len(classes) - 1, allow_ignore=True, hint="check the classes file or the mask encoding")
    return Plan(splits, classes, rule, {"importer": "folder", "root": root.resolve().name, **split_rule})


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
    options = ImportOptions(resize=square(size), workers=workers, compression=compression)
    plan = folder_plan(Path(root), classes_file, test_fraction, seed)
    if size is not None:
        plan.source["size"] = int(size)
    return write(out, plan, options)
