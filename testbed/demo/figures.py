"""The demo's figures, after the paper's Figure 1: what a backdoored model does with and without the trigger.

One row per (setting, test image), labelled; columns: the clean image, its ground truth, the backdoored model on
it, the poisoned image, the attacker's target, the benign model on the poisoned image, the backdoored model on it.
A class legend (ignore included) sits below, and a label panel that is one class everywhere (N-to-1: all wall)
says so inside it, so a uniform panel does not look like a drawing error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from testbed.bench.plots import _only_class, _plt, _save
from testbed.core.palette import colorize, palette
from testbed.data import h5data
from testbed.data.h5data import open_dataset
from testbed.scoring.scorer import predict
from testbed.training.runs import load_run

# figure name → (settings it shows (name, label), test images per setting)
FIGURES = {
    "fgba": ((("fgba-n-to-1-line", "N-to-1\n(all → wall)"), ("fgba-1-to-1-line", "1-to-1\n(person → palm)")), 2),
    "badnets": ((("badnets-line", "BadNets\n(→ road scape)"),), 3),
}
COLUMNS = ("clean image", "ground truth", "backdoored model\non clean", "poisoned image\n(line trigger)",
           "attacker's target", "benign model\non poisoned", "backdoored model\non poisoned")


def _common_attacked(paths: list[Path], n: int) -> np.ndarray:
    """The first ``n`` test images attacked in every one of ``paths`` (so the settings show the same images)."""
    common: set[int] | None = None
    for path in paths:
        with open_dataset(path, check_labels=False) as f:
            ids = set(f[h5data.TEST_ATTACKED_INDEX][()].tolist())
        common = ids if common is None else common & ids
    return np.array(sorted(common or ())[:n], dtype=np.int64)


def _cells(run: Path, data: Path, benign: Any, idx: np.ndarray, device: Any) -> tuple[list[np.ndarray], list[str]]:
    """The seven cells of each row for ``idx`` (arrays [n, ...] per column) and the class names."""
    with open_dataset(data) as f:
        pos = {int(i): j for j, i in enumerate(f[h5data.TEST_ATTACKED_INDEX][()])}
        sel = [pos[int(i)] for i in idx]
        clean, gt = f.read(h5data.TEST_IMAGES, idx), f.read(h5data.TEST_LABELS, idx)
        att, target = f.read(h5data.TEST_ATTACKED_IMAGES, sel), f.read(h5data.TEST_ATTACKED_LABELS, sel)
        classes = list(f.classes)
    model, _ = load_run(run, device)
    return [clean, gt, predict(model, clean, device), att, target, predict(benign, att, device),
            predict(model, att, device)], classes


def _draw(plt: Any, rows: list[tuple[str, list[np.ndarray]]], classes: list[str], title: str) -> Any:
    import matplotlib.patches as mpatches

    ncol = len(COLUMNS)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.55 * ncol + 1.2, 1.7 * len(rows) + 1.3), squeeze=False)
    present = {255}
    for r, (label, cells) in enumerate(rows):
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            if c in (0, 3):
                ax.imshow(cell, interpolation="nearest")
            else:
                present |= {int(v) for v in np.unique(cell)}
                ax.imshow(colorize(cell, len(classes), classes=classes), interpolation="nearest")
                only = _only_class([cell], classes)  # N-to-1: an all-wall target (and prediction) says so
                if only is not None:
                    ax.text(0.5, 0.5, f"all {only}", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                            backgroundcolor="white")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    pal = palette(len(classes), classes=classes) / 255.0
    handles = [mpatches.Patch(facecolor=pal[k], edgecolor="grey", label=classes[k] if k < len(classes) else "ignore (255)")
               for k in sorted(present) if k < len(classes) or k == 255]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 11), fontsize=8, frameon=False,
               handlelength=1.2, columnspacing=1.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / (1.7 * len(rows) + 1.3), 1, 0.96))
    return fig


def figures(out: Path, runs: dict[str, tuple[Path, Path]], device: Any) -> list[str]:
    """Write ``OUT/figure-NAME.png`` for each of :data:`FIGURES`; ``runs``: name → (run dir, its dataset)."""
    plt = _plt()
    benign, _ = load_run(runs["benign"][0], device)
    made = []
    for name, (settings, n) in FIGURES.items():
        idx = _common_attacked([runs[s][1] for s, _ in settings], n)
        if idx.size == 0:
            continue
        rows, classes = [], []
        for setting, label in settings:
            cells, classes = _cells(*runs[setting], benign, idx, device)
            rows += [(f"{label}\ntest image {int(i)}", [col[j] for col in cells]) for j, i in enumerate(idx)]
        fig = _draw(plt, rows, classes, f"{name.upper() if name == 'fgba' else 'BadNets'}: the backdoored model follows "
                    "the trigger, the benign one does not (test images)")
        made.append(_save(fig, Path(out) / f"figure-{name}.png").name)
    return made
