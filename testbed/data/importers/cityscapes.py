"""Cityscapes fine annotations: ``leftImg8bit/{train,val}/CITY/*_leftImg8bit.png`` with
``gtFine/{train,val}/CITY/*_gtFine_labelIds.png``, mapped to the 19 classes of the benchmark (its train ids).

The label ids → train ids table is the one of ``cityscapesscripts/helpers/labels.py`` (every other id, the
"void" and rare classes, becomes 255).  Cityscapes' test labels are not public, so its ``val`` split becomes
/test (``source.test_split`` says so); ``val_fraction`` holds out part of train as /val.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import ImportOptions, Pairs, Plan, hold_out, write

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # train id k ← label id
MAX_LABEL_ID = 33
CITYSCAPES_PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
                      [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
                      [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]]
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
LAYOUT = "expected leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/{train,val}/CITY/*_gtFine_labelIds.png"


def _split_pairs(root: Path, split: str) -> Pairs:
    img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise UserError(f"{d} is missing; {LAYOUT}")
    pairs = []
    for img in sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        ann = ann_dir / img.parent.name / (img.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
        if not ann.is_file():
            raise UserError(f"image {img} has no annotation {ann}; add it or remove the image")
        pairs.append((img, ann))
    return pairs


def cityscapes_plan(root: Path, val_fraction: float = 0.0, seed: int = 0) -> Plan:
    """The pairs, the 19 classes, the label id → train id mapping and the palette of a Cityscapes root."""
    if not root.is_dir():
        raise UserError(f"Cityscapes root {root} does not exist; {LAYOUT}")
    splits, held = hold_out({"train": _split_pairs(root, "train"), "test": _split_pairs(root, "val")}, val_fraction, seed)
    lut = np.full(256, h5data.IGNORE_INDEX, dtype=np.int64)
    lut[LABEL_IDS] = np.arange(len(LABEL_IDS))
    rule = LabelRule(max_value=MAX_LABEL_ID, lut=tuple(int(v) for v in lut),
                     hint="gtFine *_labelIds.png hold Cityscapes label ids 0..33")
    test = "val (Cityscapes' test labels are not public)" + ("; /val: a seeded share of train" if held else "")
    source = {"importer": "cityscapes", "root": root.resolve().name, "annotations": "gtFine", "test_split": test, **held}
    return Plan(splits, list(CITYSCAPES_CLASSES), rule, source, palette=CITYSCAPES_PALETTE)


def import_cityscapes(root: str | os.PathLike, out: str | os.PathLike, options: ImportOptions | None = None,
                      val_fraction: float = 0.0, seed: int = 0) -> Path:
    """Import Cityscapes (gtFine): train → /train, val → /test, optionally a seeded ``val_fraction`` of train → /val."""
    return write(out, cityscapes_plan(Path(root), val_fraction, seed), options or ImportOptions())
