"""Learning curves: how a run's val mIoU (and, on poisoned data, its ASR) moved while it trained.

With ``TrainConfig.val_every = K`` (``testbed train --val-every K``, or ``val_every`` in a zoo's ``[train]``)
the loop calls :func:`curve_point` after every K-th epoch and after the last; the points travel in
``train_log.jsonl`` (and the checkpoint), so a resumed run keeps its curve.  :func:`write_curve` then writes
``curve.csv``, ``curve.json`` and ``curve.png`` into the run directory.

Which split is "val": the file's ``/val`` split when it has one (the importers of real datasets write it);
else ``/test``, and the curve says so (``val_split: "test"``) — choosing epochs on the test split is then
the reader's decision to make knowingly.  ASR is measured on ``/test_attacked`` exactly as the scorer does
(pixels whose target differs from the ground truth, both valid).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from testbed.core import atomic
from testbed.data import h5data
from testbed.scoring.metrics import AttackMeter, ConfusionMatrix
from testbed.scoring.scorer import iter_predictions


COLUMNS = ("epoch", "loss", "lr", "val_mIoU", "val_PA", "ASR")


@torch.no_grad()
def curve_point(model: nn.Module, data_path: Path, device: torch.device, batch_size: int) -> dict[str, Any]:
    """``{"val_split", "val_mIoU", "val_PA", "ASR"}`` (percentages; ASR None without an attacked split)."""
    with h5data.open_dataset(data_path, check_labels=False) as f:
        h5, k = f.file, f.num_classes
        split = "val" if h5data.VAL_IMAGES in h5 else "test"
        images, labels = (h5[h5data.path(split, a)] for a in ("images", "labels"))
        cm = ConfusionMatrix(k, device, f.ignore_index)
        for s, e, _, pred in iter_predictions(model, images, device, batch_size, None, k, f"curve {split}"):
            cm.update(pred, torch.from_numpy(np.asarray(labels[s:e])))
        point = {"val_split": split, "val_mIoU": 100 * cm.miou(), "val_PA": 100 * cm.pixel_accuracy(), "ASR": None}
        if h5data.TEST_ATTACKED_IMAGES in h5:
            meter = AttackMeter(k, device, f.ignore_index)
            target, gt = h5[h5data.TEST_ATTACKED_LABELS], h5[h5data.TEST_ATTACKED_GT]
            for s, e, _, pred in iter_predictions(model, h5[h5data.TEST_ATTACKED_IMAGES], device, batch_size, None, k,
                                                  "curve attacked"):
                meter.update(pred, np.asarray(target[s:e]), np.asarray(gt[s:e]))
            point["ASR"] = 100 * meter.asr() if meter.asr_counts[1] else None
    return point


def curve_rows(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log's epochs that carry a curve point, as rows of :data:`COLUMNS` (+ ``val_split``)."""
    return [{**{c: rec.get(c) for c in COLUMNS}, "val_split": rec["val_split"]} for rec in log if "val_split" in rec]


def write_curve(out: Path, log: list[dict[str, Any]], title: str) -> None:
    """``curve.csv``, ``curve.json`` and ``curve.png`` in ``out`` (nothing when no epoch has a point)."""
    rows = curve_rows(log)
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "val_split"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    atomic.write_text(out / "curve.csv", buf.getvalue())
    atomic.write_json(out / "curve.json", {"title": title, "points": rows})
    plot_curve(rows, out / "curve.png", title)


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Val mIoU and ASR (left axis, %) and the training loss (right axis) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(epochs, [r["val_mIoU"] for r in rows], "o-", color="tab:blue", ms=3,
            label=f"mIoU on /{rows[-1]['val_split']}")
    asr = [(e, r["ASR"]) for e, r in zip(epochs, rows) if r["ASR"] is not None]
    if asr:
        ax.plot(*zip(*asr), "s-", color="tab:red", ms=3, label="ASR on /test_attacked")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    loss_ax = ax.twinx()
    loss_ax.plot(epochs, [r["loss"] for r in rows], "--", color="0.4", lw=1, label="training loss")
    loss_ax.set_ylabel("training loss")
    handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic.atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
