"""Print the learning-curve table of docs/camvid.md from the committed curve runs.

Usage:
    python docs/make_camvid_curves.py [FOLDER ...]      (default: docs/results/camvid-curves*/)

Each FOLDER holds one sub-folder per zoo entry with the files a zoo build leaves in an entry's run directory
(curve.csv, metrics.json, config.json; the benign entry also reference.json: the benign model
scored on every attacked test set).  Nothing is trained here: the table is read from those files, so anyone can
check it against them.  Columns: val mIoU's best and its epoch; the best over the last 20% of the epochs (the
plateau rule: within 1 point of the best); test mIoU-B with its difference from the benign model of the same
folder; test PA-B; ASR on the attacked test split, with the benign model's ASR on the same set (the floor);
training seconds as the run recorded them (the CPU and its load are stated on the page).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
HEADER = ("| entry | epochs | val mIoU: best (epoch) | best over the last 20% | plateau rule | test mIoU-B | "
          "test PA-B | ASR (benign floor) | training |")


def curve_rows(entry: Path) -> list[dict[str, str]]:
    """The rows of ``entry/curve.csv`` for each epoch the curve evaluated (epoch, val_mIoU, ASR, ...)."""
    with open(entry / "curve.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("val_mIoU")]


def curve_points(entry: Path) -> list[tuple[int, float]]:
    """(epoch, val mIoU) for each epoch the curve evaluated."""
    return [(int(r["epoch"]), float(r["val_mIoU"])) for r in curve_rows(entry)]


def entry_row(entry: Path, benign: Path | None) -> str:
    """One table row for the run directory ``entry`` (``benign``: the same folder's benign entry, if any)."""
    points = curve_points(entry)
    config = json.loads((entry / "config.json").read_text())
    epochs = config["train"]["epochs"]
    best_epoch, best = max(points, key=lambda p: p[1])
    late = max(v for e, v in points if e > 0.8 * epochs)
    metrics = json.loads((entry / "metrics.json").read_text())
    seconds = config["training_seconds"]
    attack = entry.name.split("--")[1]
    miou = f"{metrics['mIoU-B']:.1f}"
    asr = "—"
    if benign is not None and entry != benign:
        base = json.loads((benign / "metrics.json").read_text())
        miou += f" ({metrics['mIoU-B'] - base['mIoU-B']:+.1f})"
        floor = json.loads((benign / "reference.json").read_text()).get(attack, {}).get("ASR")
        asr = f"{metrics['ASR']:.1f}" + (f" ({floor:.1f})" if floor is not None else "")
    rule = "holds" if best - late <= 1.0 else "fails"
    return (f"| {attack} | {epochs} | {best:.1f} ({best_epoch}) | {late:.1f} | {rule} ({best - late:.1f} below) | "
            f"{miou} | {metrics['PA-B']:.1f} | {asr} | {seconds:.0f} s |")


def table(folder: Path) -> str:
    """The markdown table for every entry under ``folder`` (benign first)."""
    entries = sorted(p for p in folder.iterdir() if (p / "curve.csv").is_file())
    benign = next((p for p in entries if "--benign--" in p.name), None)
    entries.sort(key=lambda p: p != benign)
    rows = [entry_row(p, benign) for p in entries]
    return "\n".join([HEADER, "|" + "---|" * HEADER.count(" | ") + "---|", *rows])


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv] or sorted(p for p in (DOCS / "results").glob("camvid-curves*") if p.is_dir())
    for folder in folders:
        print(f"{folder.name}:\n\n{table(folder)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
