"""Any ``ROOT/images`` + ``ROOT/masks`` folder of class-id masks (docs/data-format.md, "Importing a folder")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import IMAGE_EXTENSIONS, ImportOptions, Plan, images_in, pair, read_classes_file, write

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderLayout:
    """How to read a folder: the seeded ``test_fraction`` split when there are no ``train``/``test`` sub-folders,
    mask values to ``ignore`` (stored as 255), and an optional ``palette_file`` (one ``R G B`` line per class)."""

    test_fraction: float = 0.2
    seed: int = 0
    ignore: tuple[int, ...] = ()
    palette_file: str | os.PathLike | None = None


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


def read_palette_file(path: str | os.PathLike, num_classes: int) -> list[list[int]]:
    """One ``R G B`` (or ``R,G,B``) line per class, 0..255 each, in class id order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"palette file {path} not found; give a text file with one 'R G B' line per class")
    rows = [line.replace(",", " ").split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != num_classes:
        raise UserError(f"palette file {path} has {len(rows)} colours for {num_classes} classes; give one 'R G B' line per class")
    for n, row in enumerate(rows, 1):
        if len(row) != 3 or not all(v.isdigit() and int(v) <= 255 for v in row):
            raise UserError(f"palette file {path} colour {n} reads {' '.join(row)!r}; write three integers 0..255")
    return [[int(v) for v in row] for row in rows]


def _label_rule(classes: list[str], ignore: tuple[int, ...]) -> LabelRule:
    bad = [v for v in ignore if not 0 <= int(v) < h5data.IGNORE_INDEX]
    if bad:
        raise UserError(f"--ignore values must be mask values 0..254, got {bad[0]}")
    lut = np.arange(256, dtype=np.int64)
    lut[list(ignore)] = h5data.IGNORE_INDEX
    extra = tuple(sorted({int(v) for v in ignore if v >= len(classes)}))
    return LabelRule(max_value=len(classes) - 1, lut=tuple(int(v) for v in lut), allow_ignore=True,
                     hint="check the classes file, --ignore or the mask encoding", extra=extra)


def _splits(root: Path, layout: FolderLayout) -> tuple[dict, dict]:
    img_root, mask_root = root / "images", root / "masks"
    if not img_root.is_dir():
        raise UserError(f"{root} has no images/ folder; expected ROOT/images and ROOT/masks")
    if not mask_root.is_dir():
        raise UserError(f"{root} has no masks/ folder; expected ROOT/images and ROOT/masks (class-id PNGs)")
    if (img_root / "train").is_dir() and (img_root / "test").is_dir():
        names = [s for s in ("train", "val", "test") if (img_root / s).is_dir()]
        return {s: pair(images_in(img_root / s), mask_root / s, MASK_EXTENSIONS) for s in names}, {"split": "folders"}
    return _seeded_split(img_root, mask_root, layout.test_fraction, layout.seed)


def folder_plan(root: Path, classes_file: str | os.PathLike, layout: FolderLayout) -> Plan:
    """The pairs, classes, label rule (ids, 255, --ignore values) and palette of an images/+masks/ folder."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    classes = read_classes_file(classes_file)
    rule = _label_rule(classes, tuple(layout.ignore))
    palette = read_palette_file(layout.palette_file, len(classes)) if layout.palette_file is not None else None
    splits, split_rule = _splits(root, layout)
    source = {"importer": "folder", "root": root.resolve().name, **split_rule, "test_split": "test"}
    if layout.ignore:
        source["ignore"] = sorted(int(v) for v in layout.ignore)
    return Plan(splits, classes, rule, source, palette=palette)


def import_folder(root: str | os.PathLike, classes_file: str | os.PathLike, out: str | os.PathLike,
                  options: ImportOptions | None = None, layout: FolderLayout | None = None) -> Path:
    """Import ``ROOT/images`` + ``ROOT/masks`` pairs matched by file stem; masks hold class ids, 255 = ignore.

    With ``images/train`` and ``images/test`` (and the same under ``masks/``) those are the splits, with
    ``images/val`` a /val split too; otherwise a seeded ``layout.test_fraction`` of the pairs becomes the test
    split.  Without a resize in ``options`` all images must already share one size.
    """
    return write(out, folder_plan(Path(root), classes_file, layout or FolderLayout()), options or ImportOptions())
