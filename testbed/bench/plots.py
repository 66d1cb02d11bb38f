"""Figures for defend/bench reports (matplotlib, Agg backend: no display needed, same bytes every run).

Each function draws one PNG from :class:`~testbed.evaluation.rows.DefenseRow` objects and returns its path, or
``None`` when the rows hold nothing to draw.  No figure knows which defense made a row: the per-row figures
(:data:`ROW_FIGURES`) read ``row.details`` keys named in docs/writing-a-defense.md (any defense that fills
them gets the figure) or the row's typed filter scores; absent keys mean no plot, never an error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from testbed.core import atomic
from testbed.evaluation.rows import DefenseRow
from testbed.core.palette import colorize, palette
from testbed.stats.rows import defense_label

BEFORE_COLOUR, AFTER_COLOUR, CONTROL_COLOUR = "#8c8c8c", "#1f77b4", "#ff7f0e"


def shown_name(row: DefenseRow) -> str:
    """The defense as the report's tables name it: its name and parameters (``ft[epochs=2]``)."""
    return defense_label(row.defense, dict((row.settings or {}).get("params") or {}))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "segbackdoor"
    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with atomic.atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _blank(ax: Any, shape: tuple[int, ...], text: str, colour: str) -> None:
    """A cell without a prediction: white, with ``text`` (a rejected input is also crossed out)."""
    ax.imshow(np.full(shape, 255, np.uint8), interpolation="nearest")
    if text == "rejected":
        ax.plot([0, shape[1] - 1], [0, shape[0] - 1], color=colour, linewidth=1)
        ax.plot([0, shape[1] - 1], [shape[0] - 1, 0], color=colour, linewidth=1)
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=colour, fontsize=8,
            backgroundcolor="white")


def _only_class(maps: Sequence[np.ndarray], classes: Sequence[str]) -> str | None:
    """The one class every pixel of ``maps`` shows (ignore aside), or None: a uniform column is said in its title,
    so an all-'wall' N-to-1 target does not look like a drawing error."""
    present = {int(c) for m in maps for c in np.unique(m)} - {255}
    if len(present) != 1:
        return None
    c = present.pop()
    return classes[c] if c < len(classes) else str(c)


def _titled(title: str, maps: Sequence[np.ndarray], classes: Sequence[str]) -> str:
    only = _only_class(maps, classes)
    return f"{title}\n(all {only})" if only is not None else title


def _panel_rows(rows: Sequence[DefenseRow]) -> list[tuple[str, Any, int]]:
    """(block, panel, index) per figure row: the attacked images first, then the benign ones."""
    base = rows[0]
    out: list[tuple[str, Any, int]] = []
    for block, panel in (("attacked", base.panel), ("benign", base.benign_panel)):
        if panel is not None:
            out += [(block, panel, i) for i in range(len(panel.images))]
    return out


def _panels_what(lines: Sequence[tuple[str, Any, int]]) -> str:
    """What the panel rows are, as the figure shows them."""
    blocks = list(dict.fromkeys(b for b, _, _ in lines))
    if blocks == ["attacked", "benign"]:
        return "attacked test images, then benign ones"
    if blocks == ["benign"]:
        return "benign test images (no attacked test set: a benign model)"
    return f"{blocks[0]} test images"


def panels(path: str | os.PathLike, rows: Sequence[DefenseRow], classes: Sequence[str]) -> Path | None:
    """Paper-Figure-1-style panels: image, benign label, target label, prediction before and after each defense;
    attacked test images first, then benign ones (a repair costs benign accuracy, a filter rejects benign inputs)."""
    rows = [r for r in rows if r.panel is not None or r.benign_panel is not None]
    if not rows or not _panel_rows(rows):
        return None
    plt = _plt()
    import matplotlib.patches as mpatches

    lines = _panel_rows(rows)
    after_cols = [r for r in rows if any(p is not None and p.after is not None for p in (r.panel, r.benign_panel))]
    k = len(classes)

    def after_of(r: DefenseRow, block: str) -> Any:
        return r.panel if block == "attacked" else r.benign_panel

    targets = [p.target[i] for b, p, i in lines if p.target is not None]
    shown = {j: [] for j in range(len(after_cols))}
    for block, _, i in lines:
        for j, r in enumerate(after_cols):
            q = after_of(r, block)
            if q is not None and q.after is not None and not (q.rejected is not None and q.rejected[i]):
                shown[j].append(q.after[i])
    titles = ["image", "benign label", _titled("target label", targets, classes),
              _titled("before defense", [p.before[i] for _, p, i in lines], classes)]
    titles += [_titled(f"after {shown_name(r)}", shown[j], classes) for j, r in enumerate(after_cols)]
    keep = [j for j in range(len(titles)) if j != 2 or targets]  # no target column when nothing was attacked
    titles = [titles[j] for j in keep]
    ncol, n = len(titles), len(lines)
    fig, axes = plt.subplots(n, ncol, figsize=(1.9 * ncol + 0.4, 1.9 * n + 1.0), squeeze=False)
    present: set[int] = set()
    for row_i, (block, p, i) in enumerate(lines):
        cells: list[Any] = [p.images[i], p.gt[i], None if p.target is None else p.target[i], p.before[i]]
        for r in after_cols:
            q = after_of(r, block)
            rej = q is not None and q.rejected is not None and bool(q.rejected[i])
            cells.append("rejected" if rej else (q.after[i] if q is not None and q.after is not None else None))
        for j, (col, cell) in enumerate((c, cells[c]) for c in keep):
            ax = axes[row_i, j]
            if isinstance(cell, str) or cell is None:
                _blank(ax, p.images[i].shape, cell if isinstance(cell, str) else "not attacked" if col == 2 else "—",
                       "red" if cell == "rejected" else "grey")
            elif col == 0:
                ax.imshow(cell, interpolation="nearest")
            else:
                present |= {int(c) for c in np.unique(cell)}
                ax.imshow(colorize(cell, k, classes=classes), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row_i == 0:
                ax.set_title(titles[j], fontsize=8)
        axes[row_i, 0].set_ylabel(f"{block} #{int(p.index[i])}", fontsize=8)
    pal = palette(k, classes=classes) / 255.0
    handles = [mpatches.Patch(facecolor=pal[c], edgecolor="grey", label=classes[c] if c < k else "ignore (255)")
               for c in sorted(c for c in present if c < k or c == 255)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.suptitle(f"{rows[0].model} ({rows[0].attack}): {_panels_what(lines)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return _save(fig, Path(path))


def bars(path: str | os.PathLike, rows: Sequence[DefenseRow]) -> Path | None:
    """ASR and mIoU-B before vs after (and the random-removal control of retraining defenses), per defense.

    No ASR panel when no row has one (a benign model: no attacked test set); the legend sits above the axes so
    it never covers a bar at 100%."""
    rows = [r for r in rows if r.after]
    if not rows:
        return None
    plt = _plt()
    keys = [k for k in ("ASR", "mIoU-B") if any((r.before or {}).get(k) is not None or r.after.get(k) is not None
                                                 for r in rows)]
    if not keys:
        return None
    series = [("before", BEFORE_COLOUR, lambda r: r.before), ("after", AFTER_COLOUR, lambda r: r.after)]
    if any(r.after_random for r in rows):
        series.append(("after, random-removal control", CONTROL_COLOUR, lambda r: r.after_random))
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.5, 1.2 * len(rows) + 2) * len(keys), 3.8), squeeze=False)
    x = np.arange(len(rows))
    for ax, key in zip(axes[0], keys):
        for s_i, (label, colour, get) in enumerate(series):
            values = [_num((get(r) or {}).get(key)) for r in rows]
            xs = x + (s_i - (len(series) - 1) / 2) * width
            ax.bar(xs, values, width, label=label, color=colour)
            for xi, v in zip(xs, values):  # the number on each bar: a 0 is not mistaken for a missing bar
                if not math.isnan(v):
                    ax.text(xi, min(v, 100) + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)  # 99.86 → 99.9
        ax.set_xticks(x, [shown_name(r) for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{key} (%)")
        ax.set_ylim(0, 112)
        ax.set_title(key, fontsize=9)
    note = "" if "ASR" in keys else "\nno attacked test set (a benign model): no ASR"
    fig.suptitle(f"{rows[0].model} ({rows[0].attack}){note}", fontsize=9)
    top = 0.88 if not note else 0.82
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, top + 0.05))
    fig.tight_layout(rect=(0, 0, 1, top))
    return _save(fig, Path(path))


def curve(path: str | os.PathLike, row: DefenseRow) -> Path | None:
    """``details["curve"]``: list of {"fraction", and any of "miou_b", "miou_clean", "asr"} → one line per metric."""
    points = (row.details or {}).get("curve")
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) and "fraction" in p for p in points):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    x = [_num(p["fraction"]) * 100 for p in points]
    drawn = 0
    finals = _curve_finals(row)
    for key, label in (("miou_b", "mIoU-B"), ("miou_clean", "clean-subset mIoU"), ("asr", "ASR")):
        ys = [p.get(key) for p in points]
        if all(y is None for y in ys):
            continue
        ys = [_num(y) for y in ys]
        scale = 100 if max((abs(y) for y in ys if not math.isnan(y)), default=0) <= 1.0 else 1  # fractions → percent
        (line,) = ax.plot(x, [y * scale for y in ys], marker="o", markersize=3, label=label)
        drawn += 1
        kept, final = finals.get("kept"), finals.get(key)
        if kept is not None and final is not None:  # the result after fine-tuning, at the kept point
            ax.plot([kept], [_num(final) * (100 if key == "miou_clean" and scale == 100 else 1)], marker="*",
                    markersize=11, color=line.get_color(), markeredgecolor="black", linestyle="none")
    if not drawn:
        plt.close(fig)
        return None
    if finals.get("kept") is not None:
        ax.axvline(finals["kept"], color="grey", linestyle="--", linewidth=1,
                   label=f"kept: {finals['kept']:.1f}% pruned (★ after fine-tuning)")
    ax.set_xlabel("pruned channels (%)")
    ax.set_ylabel("%")
    ax.set_title(f"{shown_name(row)} on {row.model}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)  # never over a point
    fig.tight_layout()
    return _save(fig, Path(path))


def _curve_finals(row: DefenseRow) -> dict[str, Any]:
    """Where a pruning curve stopped (percent pruned) and the scores after the defense's last step there (fine-tuning):
    the row's after-scores (mIoU-B, ASR, percent) and the clean-subset mIoU the defense measured (a fraction)."""
    d = row.details or {}
    kept = d.get("pruned_fraction")
    if not isinstance(kept, (int, float)):
        return {}
    after = row.after or {}
    return {"kept": 100 * float(kept), "miou_b": after.get("mIoU-B"), "asr": after.get("ASR"),
            "miou_clean": d.get("miou_clean_final")}


def score_histogram(path: str | os.PathLike, row: DefenseRow) -> Path | None:
    """Filter scores of benign vs attacked test inputs (and the clean subset's, ``details["clean_scores"]``)."""
    scores = row.filter_scores
    if scores is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    series = [("benign test", scores.benign), ("attacked test", scores.attacked)]
    clean = (row.details or {}).get("clean_scores")
    if isinstance(clean, list) and clean:
        series.insert(0, ("clean subset", np.asarray([_num(v) for v in clean])))
    finite = np.concatenate([s[np.isfinite(s)] for _, s in series if len(s)]) if series else np.empty(0)
    if finite.size == 0:
        plt.close(fig)
        return None
    bins = np.linspace(finite.min(), finite.max() + 1e-12, 30)
    for label, s in series:
        s = s[np.isfinite(s)]
        if s.size:
            ax.hist(s, bins=bins, alpha=0.5, label=f"{label} (n={s.size})", density=True)
    ax.axvline(scores.threshold, color="red", linestyle="--", label="threshold")
    ax.set_xlabel("score (higher = more suspicious)")
    ax.set_title(f"{shown_name(row)} on {row.model}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def _norm_bars(ax, labels: list[str], values: list[float], row: DefenseRow, d: dict[str, Any]) -> None:
    ax.bar(np.arange(len(values)), values, color=AFTER_COLOUR)
    if len(labels) <= 30:
        ax.set_xticks(np.arange(len(values)), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("mask L1 norm")
    ai = row.verdict.score if row.verdict is not None else None
    if ai is None and isinstance(d.get("anomaly_index"), (int, float)):
        ai = d["anomaly_index"]
    ax.set_title("candidate mask norms" + (f" (anomaly index {ai:.2f})" if isinstance(ai, (int, float)) else ""), fontsize=9)


def _norm_curves(ax, curves: dict[str, Any], flagged: list[str]) -> None:
    """Mask L1 norm per optimisation step, one line per candidate: did each search converge?"""
    for label, ys in curves.items():
        ys = [_num(v) for v in (ys or [])]
        if ys:
            bold = label in flagged
            ax.plot(np.arange(1, len(ys) + 1), ys, linewidth=1.6 if bold else 0.8, alpha=1.0 if bold else 0.6,
                    label=label if bold or len(curves) <= 12 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("mask L1 norm")
    ax.set_title("convergence per candidate" + (" (bold: flagged)" if flagged else ""), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2, loc="upper right")


def candidate_masks(path: str | os.PathLike, row: DefenseRow) -> Path | None:
    """``details["norms"]`` (candidate → mask L1 norm, a dict or list), ``details["anomaly_index"]``,
    ``details["mask_norm_curves"]`` (candidate → norm per step) and ``details["mask"]`` (the most anomalous
    candidate's recovered mask, [H,W]), e.g. from trigger synthesis."""
    d = row.details or {}
    norms, mask, curves = d.get("norms"), d.get("mask"), d.get("mask_norm_curves")
    if isinstance(norms, dict):
        labels, values = list(map(str, norms)), [_num(v) for v in norms.values()]
    elif isinstance(norms, list) and norms:
        labels, values = [str(i) for i in range(len(norms))], [_num(v) for v in norms]
    else:
        labels, values = [], []
    has_mask = isinstance(mask, list) and mask and isinstance(mask[0], list)
    has_curves = isinstance(curves, dict) and any(curves.values())
    panels = [k for k, on in (("bars", bool(values)), ("curves", has_curves), ("mask", has_mask)) if on]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "bars":
            _norm_bars(ax, labels, values, row, d)
        elif kind == "curves":
            _norm_curves(ax, curves, [str(x) for x in d.get("flagged") or []])
        else:
            im = ax.imshow(np.asarray(mask, dtype=float), cmap="magma", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("recovered mask" + (f" ({d.get('mask_candidate')})" if d.get("mask_candidate") else ""), fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{shown_name(row)} on {row.model}", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def _cost_items(cost: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, log10 seconds) from ``details["cost"]``: either ``"projections"`` = [{"label", "log10_seconds" |
    "seconds"}], or trigger-synthesis's estimates ``"projected"``/``"projected_ade20k"`` = {"image_seconds",
    "pairs_seconds", "log10_matrices_seconds"} (searches over K targets, K(K−1) pairs, K^K − 1 attack
    matrices, from measured passes) plus the measured ``"elapsed_seconds"``."""
    def log(v: Any) -> float | None:
        return math.log10(v) if isinstance(v, (int, float)) and v > 0 else None

    items: list[tuple[str, float | None]] = []
    if isinstance(cost.get("projections"), list):
        for p in cost["projections"]:
            if isinstance(p, dict):
                v = p.get("log10_seconds")
                items.append((str(p.get("label", len(items))), v if v is not None else log(p.get("seconds"))))
    for key, where in (("projected", "this data"), ("projected_ade20k", "ADE20K 150 cl. 512²")):
        p = cost.get(key)
        if isinstance(p, dict):
            items += [(f"{where}: K image targets (est.)", log(p.get("image_seconds"))),
                      (f"{where}: K(K−1) pairs (est.)", log(p.get("pairs_seconds"))),
                      (f"{where}: K^K−1 matrices (est.)", p.get("log10_matrices_seconds"))]
    if items:
        items.append(("measured (this run)", log(cost.get("elapsed_seconds"))))
    return [(k, float(v)) for k, v in items if isinstance(v, (int, float)) and math.isfinite(v)]


def cost_projection(path: str | os.PathLike, row: DefenseRow) -> Path | None:
    """``details["cost"]`` projections (see :func:`_cost_items`) → horizontal bars of log10 seconds."""
    cost = (row.details or {}).get("cost")
    if not isinstance(cost, dict):
        return None
    items = _cost_items(cost)
    if not items:
        return None
    labels, values = [k for k, _ in items], [v for _, v in items]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(values) + 1.4))
    y = np.arange(len(values))
    # a search over all K^K − 1 attack matrices reaches 10^300+ seconds: clip such bars so the feasible ones stay readable
    small = [v for v in values if v < 100]
    cap = max(12.0, 1.3 * max(small, default=0.0))
    shown = [min(v, cap) for v in values]
    colours = [BEFORE_COLOUR if "measured" in lab else AFTER_COLOUR for lab in labels]
    bars = ax.barh(y, shown, color=colours)
    for b, v in zip(bars, values):
        if v > cap:
            b.set_hatch("//")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, min(shown) - 0.5), cap * 1.25)
    ax.set_xlabel("log10(seconds)  (hatched: clipped)")
    for ref, name in ((math.log10(3600), "1 h"), (math.log10(86400 * 365), "1 year")):
        ax.axvline(ref, color="grey", linestyle=":", linewidth=1)
        ax.text(ref, len(values) - 0.4, f" {name}", fontsize=7, color="grey")
    for yi, v, sh in zip(y, values, shown):
        ax.text(sh, yi, f" {v:.1f}" if v <= cap else f" 10^{v:.0f} s", va="center", fontsize=6)
    ax.set_title(f"{shown_name(row)}: projected cost (log10 s; estimates from measured passes, not bounds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


# Per-row figures: file prefix → drawer; each reads what any defense may put in its row, none names a defense.
ROW_FIGURES: tuple[tuple[str, Callable[[str | os.PathLike, DefenseRow], Path | None]], ...] = (
    ("curve", curve), ("scores", score_histogram), ("trigger", candidate_masks), ("cost", cost_projection))
