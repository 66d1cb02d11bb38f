"""PASCAL VOC 2012 segmentation: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs whose indices are
the class ids 0..20, 255 = object boundary → ignore) and ``ImageSets/Segmentation/{train,val}.txt`` (one stem a
line).  VOC's test labels are not public, so its ``val`` list becomes /test; ``val_fraction`` holds out part of
train as /val.  ROOT is ``VOCdevkit/VOC2012`` (or ``VOCdevkit``, which holds it).
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.core.errors import UserError
from testbed.core.palette import voc_colour
from testbed.data.imagefiles import LabelRule
from testbed.data.importers.base import ImportOptions, Pairs, Plan, hold_out, write

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
LAYOUT = "expected VOC2012/JPEGImages, VOC2012/SegmentationClass and VOC2012/ImageSets/Segmentation/{train,val}.txt"


def _listed(root: Path, split: str) -> Pairs:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{listing} is missing; {LAYOUT}")
    pairs = []
    for stem in (line.strip() for line in listing.read_text(encoding="utf-8").splitlines()):
        if not stem:
            continue
        img, ann = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
        if not img.is_file():
            raise UserError(f"{listing} lists {stem}, but {img} does not exist; fix the list or restore the image")
        if not ann.is_file():
            raise UserError(f"image {img} has no annotation {ann}; add it or remove {stem} from {listing.name}")
        pairs.append((img, ann))
    return pairs


def voc_plan(root: Path, val_fraction: float = 0.0, seed: int = 0) -> Plan:
    """The pairs, the 21 classes (background = 0) and VOC's palette of a VOC2012 root."""
    if (root / "VOC2012").is_dir():
        root = root / "VOC2012"
    if not root.is_dir():
        raise UserError(f"VOC root {root} does not exist; {LAYOUT}")
    for sub in ("JPEGImages", "SegmentationClass"):
        if not (root / sub).is_dir():
            raise UserError(f"{root} has no {sub}/ folder; {LAYOUT}")
    splits, held = hold_out({"train": _listed(root, "train"), "test": _listed(root, "val")}, val_fraction, seed)
    rule = LabelRule(max_value=len(VOC_CLASSES) - 1, allow_ignore=True,
                     hint="SegmentationClass PNGs hold VOC class indices 0..20 and 255 (boundary)")
    test = "val (ImageSets/Segmentation/val.txt; VOC's test labels are not public)" + (
        "; /val: a seeded share of train" if held else "")
    source = {"importer": "voc", "root": root.resolve().name, "test_split": test, **held}
    palette = [list(voc_colour(i)) for i in range(len(VOC_CLASSES))]
    return Plan(splits, list(VOC_CLASSES), rule, source, palette=palette)


def import_voc(root: str | os.PathLike, out: str | os.PathLike, options: ImportOptions | None = None,
               val_fraction: float = 0.0, seed: int = 0) -> Path:
    """Import VOC2012 segmentation: train.txt → /train, val.txt → /test, optionally part of train → /val."""
    return write(out, voc_plan(Path(root), val_fraction, seed), options or ImportOptions())
