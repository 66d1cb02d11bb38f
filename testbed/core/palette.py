"""One colour palette for every figure the project draws, so a class looks the same everywhere."""

from __future__ import annotations

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


def _voc(i: int) -> tuple[int, int, int]:
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def palette(num_classes: int) -> np.ndarray:
    """uint8 [256, 3]: row k is class k's colour; row 255 (ignore) is black."""
    pal = np.array([_voc(i + 1) for i in range(256)], dtype=np.uint8)
    pal[: len(_BASE)] = _BASE
    pal[255] = IGNORE_COLOUR
    return pal


def colorize(labels: np.ndarray, num_classes: int = 255) -> np.ndarray:
    """Label map(s) uint8 [..., H, W] → RGB uint8 [..., H, W, 3]."""
    return palette(num_classes)[np.asarray(labels, dtype=np.uint8)]
