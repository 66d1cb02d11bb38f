"""What `testbed data show` draws: one sample's panels (image, labels; a poisoned sample's before/after)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.core.atomic import atomic_file
from testbed.core.errors import UserError
from testbed.core.palette import colorize, palette
from testbed.data import h5data

Panel = tuple[str, np.ndarray, bool]  # (title, array, is_label)


@dataclass(frozen=True)
class Sample:
    """The panels of one sample and how to colour them: the class names and the file's palette (or None)."""

    panels: list[Panel]
    classes: list[str]
    palette: list[list[int]] | None = None


def _train_panels(f: h5data.SegFile, index: int, image: np.ndarray, label: np.ndarray) -> list[Panel]:
    hit = np.flatnonzero(f[h5data.POISON_INDEX] == index) if h5data.POISON_INDEX in f else np.empty(0)
    if h5data.POISON_INDEX not in f:
        return [("image", image, False), ("label", label, True)]
    if not hit.size:
        return [("image (not poisoned)", image, False), ("label", label, True)]
    k = int(hit[0])
    return [("benign image", f.read(h5data.ORIGINAL_IMAGES, [k])[0], False), ("poisoned image", image, False),
            ("benign label", f.read(h5data.ORIGINAL_LABELS, [k])[0], True), ("target label", label, True)]


def sample_panels(path: str | os.PathLike, split: str, index: int) -> Sample:
    """The panels `data show` draws for ``split[index]``, with the classes and palette of the file."""
    with h5data.open_dataset(path, check_labels=False) as f:
        splits = [s for s in ("train", "val", "test", "test_attacked") if h5data.path(s, "images") in f]
        if split not in splits:
            raise UserError(f"{path} has no split {split!r}; choose one of: {', '.join(splits)}")
        n = f.length(split)
        if not 0 <= index < n:
            raise UserError(f"--index {index} is out of range: the {split} split of {path} has {n} samples (0..{n - 1})")
        image = f.read(h5data.path(split, "images"), [index])[0]
        label = f.read(h5data.path(split, "labels"), [index])[0]
        if split == "test_attacked":
            gt = f.read(h5data.TEST_ATTACKED_GT, [index])[0]
            src = int(f.read(h5data.TEST_ATTACKED_INDEX, [index])[0]) if h5data.TEST_ATTACKED_INDEX in f else None
            panels = [(f"attacked image (test {src})" if src is not None else "attacked image", image, False),
                      ("ground truth", gt, True), ("target label", label, True)]
        elif split == "train":
            panels = _train_panels(f, index, image, label)
        else:
            panels = [("image", image, False), ("label", label, True)]
        return Sample(panels, list(f.classes), f.palette)


def draw_panels(sample: Sample, out: Path, title: str = "") -> None:
    """Draw panels side by side with a legend of the classes present; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    classes, k = sample.classes, len(sample.classes)
    present = sorted(set(np.concatenate([np.unique(a) for _, a, is_label in sample.panels if is_label]).tolist()))
    pal = palette(k, sample.palette, classes)
    fig, axes = plt.subplots(1, len(sample.panels), figsize=(2.6 * len(sample.panels), 3.0), squeeze=False)
    for ax, (name, arr, is_label) in zip(axes[0], sample.panels):
        ax.imshow(colorize(arr, k, sample.palette, classes) if is_label else arr, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(facecolor=pal[v] / 255.0, edgecolor="black", linewidth=0.3,
                     label=classes[v] if v < k else ("ignore" if v == 255 else f"id {v}?")) for v in present]
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    try:
        with atomic_file(out, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
