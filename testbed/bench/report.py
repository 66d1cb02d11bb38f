"""Writers for `testbed defend` / `testbed bench` reports: results.json, results.csv, results-aggregate.csv,
scores.csv, report.md, figures.

One row per model × defense (a :class:`~testbed.evaluation.rows.DefenseRow`, see
:func:`testbed.evaluation.runner.run_defense`); JSON, CSV and markdown are written from each row's JSON form,
``scores.csv`` and figures from its typed arrays.  The statistics beside the rows (``aggregate`` over seeds,
paired ``comparisons``, ``detection`` across models) are :mod:`testbed.stats`'s, computed from those same JSON
rows.  Every file is written atomically and the figures directory is replaced as a whole, so a reader never
sees half a file.  A figure that fails to draw is the testbed's error: it is listed in ``results.json``
``"figure_errors"`` and in report.md, and the other files are still written.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import testbed.bench.plots as plots
from testbed.bench.markdown import markdown
from testbed.core import atomic
from testbed.core.atomic import safe_name
from testbed.core.jsonutil import jsonable
from testbed.evaluation.rows import DefenseRow, public_row
from testbed.scoring.scorer import SCORE_KEYS
from testbed.stats import aggregate_csv, bench_statistics

RESULT_COLUMNS = (
    ["model", "attack", "benign_model", "attack_implanted", "defense", "kinds", "error"]
    + [f"before_{k}" for k in SCORE_KEYS]
    + [f"after_{k}" for k in SCORE_KEYS]
    + ["DER"]
    + [f"after_random_{k}" for k in SCORE_KEYS]
    + ["DER_random", "tpr", "fpr", "auroc", "threshold", "detection_confounded", "flagged_count", "flagged_fraction",
       "flagged_precision", "flagged_recall", "verdict_status", "verdict_backdoored", "verdict_score", "verdict_coverage",
       "seconds", "forward_passes", "backward_passes", "retrain_seconds", "budget_s", "budget_passes", "over_budget",
       "stopped_by", "pair_seconds", "pair_cpu_seconds", "before_cpu_seconds", "measured_on", "saved_model", "notes"]
)
SCORE_COLUMNS = ("split", "index", "score", "flagged", "model", "defense")


def _get(d: dict[str, Any] | None, key: str) -> Any:
    return None if not d else d.get(key)


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    det, fl, ver, cost = row.get("detection"), row.get("flagged"), row.get("verdict"), row.get("cost") or {}
    out = {
        "model": row["model"], "attack": row["attack"], "benign_model": row.get("benign_model"),
        "attack_implanted": row.get("attack_implanted"), "defense": row["defense"],
        "kinds": "+".join(row.get("kinds") or []), "error": row.get("error") or "",
    }
    for k in SCORE_KEYS:
        out[f"before_{k}"] = _get(row.get("before"), k)
        out[f"after_{k}"] = _get(row.get("after"), k)
        out[f"after_random_{k}"] = _get(row.get("after_random"), k)
    out.update({
        "DER": row.get("DER"), "DER_random": row.get("DER_random"), "tpr": _get(det, "tpr"), "fpr": _get(det, "fpr"),
        "auroc": _get(det, "auroc"), "threshold": _get(det, "threshold"),
        "detection_confounded": _get(det, "confounded"), "flagged_count": _get(fl, "count"),
        "flagged_fraction": _get(fl, "fraction"), "flagged_precision": _get(fl, "precision"),
        "flagged_recall": _get(fl, "recall"), "verdict_status": _get(ver, "status"),
        "verdict_backdoored": _get(ver, "backdoored"), "verdict_score": _get(ver, "score"),
        "verdict_coverage": _get(ver, "coverage"), "seconds": cost.get("seconds"),
        "forward_passes": cost.get("forward_passes"), "backward_passes": cost.get("backward_passes"),
        "retrain_seconds": cost.get("retrain_seconds"), "budget_s": cost.get("budget_s"),
        "budget_passes": cost.get("budget_passes"), "over_budget": cost.get("over_budget"),
        "stopped_by": cost.get("stopped_by"), "pair_seconds": cost.get("pair_seconds"),
        "pair_cpu_seconds": cost.get("pair_cpu_seconds"), "before_cpu_seconds": cost.get("before_cpu_seconds"),
        "measured_on": cost.get("measured_on"), "saved_model": row.get("saved_model"),
        "notes": " | ".join(row.get("notes") or []),
    })
    return {k: ("" if v is None else v) for k, v in out.items()}


def csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def scores_rows(rows: Sequence[DefenseRow]) -> list[dict[str, Any]]:
    """Per-input filter scores: split (test_benign: index into /test; test_attacked: index into /test_attacked)."""
    out = []
    for r in rows:
        s = r.filter_scores
        if s is None:
            continue
        for split, index, values in s.splits():
            for i, v in zip(np.asarray(index).tolist(), np.asarray(values, dtype=float).tolist()):
                out.append({"split": split, "index": int(i), "score": repr(float(v)), "flagged": int(v > s.threshold),
                            "model": r.model, "defense": r.defense})
    return out


def draw_figures(fig_dir: Path, rows: Sequence[DefenseRow],
                 classes: dict[str, Sequence[str]]) -> tuple[list[Path], list[dict[str, Any]]]:
    """Panels + bars per model, then every per-row figure (:data:`testbed.bench.plots.ROW_FIGURES`) of each row.

    Returns the figures drawn and the testbed's failures to draw one (model, defense, figure, error)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path | None] = []
    failed: list[dict[str, Any]] = []

    def draw(name: str, fn: Any, *args: Any, model: str, defense: str = "") -> None:
        try:
            out.append(fn(fig_dir / name, *args))
        except Exception as e:  # noqa: BLE001 — one broken figure must not cost the report
            failed.append({"model": model, "defense": defense, "figure": name, "error": f"{type(e).__name__}: {e}"})

    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        m = safe_name(model)
        draw(f"panels--{m}.png", plots.panels, mine, classes.get(model, []), model=model)
        draw(f"bars--{m}.png", plots.bars, mine, model=model)
        for r in mine:
            if r.error:
                continue
            stem = f"{m}--{safe_name(r.defense)}"
            for prefix, fn in plots.ROW_FIGURES:
                draw(f"{prefix}--{stem}.png", fn, r, model=model, defense=r.defense)
    return [p for p in out if p is not None], failed


def defense_figure_path(model: str, defense: str, name: str) -> str:
    """Where a figure a defense returned itself goes, relative to the report (its row's ``defense_figures``)."""
    return f"figures/defense--{safe_name(model)}--{safe_name(defense)}--{name}"


def write_defense_figures(fig_dir: Path, rows: Sequence[DefenseRow]) -> None:
    """The images defenses returned themselves, at :func:`defense_figure_path`."""
    for r in rows:
        for name, data in r.figure_bytes.items():
            (fig_dir / Path(defense_figure_path(r.model, r.defense, name)).name).write_bytes(data)


def verdicts_view(detection: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``"verdicts"``: the point estimates of ``"detection"``, one flat object per verdict defense (kept for
    readers of earlier reports; rates over decided verdicts, inconclusive ones counted apart)."""
    return [{"defense": d["defense"], "models": d["models"], "benign": d["benign"], "backdoored": d["backdoored"],
             "inconclusive": d["inconclusive"]["benign"] + d["inconclusive"]["backdoored"],
             "accuracy": d["accuracy"]["value"], "tpr": d["tpr"]["value"], "fpr": d["fpr"]["value"],
             "auroc": d["auroc"]["value"]} for d in detection]


def results_document(rows: Sequence[DefenseRow | dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """results.json: ``rows`` plus the statistics computed from them (seeded by the bench's seed)."""
    public = [public_row(r) for r in rows]
    stats = bench_statistics(public, seed=int(meta.get("seed") or 0))
    return {
        "format": "segbackdoor-bench",
        "version": 1,
        "meta": jsonable({k: v for k, v in meta.items() if k != "title"}),
        "rows": public,
        **jsonable(stats),
        "verdicts": jsonable(verdicts_view(stats["detection"])),
    }


def write_report(out_dir: str | Path, rows: Sequence[DefenseRow], *, meta: dict[str, Any],
                 classes: dict[str, Sequence[str]], figures: bool = True) -> dict[str, Any]:
    """Write every report file into ``out_dir`` (created if needed). Returns results.json (plus ``"figures"``, the
    figure paths relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: list[Path] = []
    figure_errors: list[dict[str, Any]] = []
    with atomic.atomic_dir(out_dir / "figures") as tmp:
        if figures:
            figs, figure_errors = draw_figures(tmp, rows, classes)
            figs = [out_dir / "figures" / p.relative_to(tmp) for p in figs]
        write_defense_figures(tmp, rows)
    doc = results_document(rows, meta)
    if figure_errors:
        doc["figure_errors"] = figure_errors
    public = doc["rows"]
    atomic.write_text(out_dir / "results.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic.write_text(out_dir / "results.csv", csv_text(RESULT_COLUMNS, [csv_row(r) for r in public]))
    atomic.write_text(out_dir / "results-aggregate.csv", aggregate_csv(doc["aggregate"]))
    atomic.write_text(out_dir / "scores.csv", csv_text(SCORE_COLUMNS, scores_rows(rows)))
    rel = [str(p.relative_to(out_dir)) for p in figs]
    atomic.write_text(out_dir / "report.md", markdown(doc, meta, rel, figure_errors))
    doc["figures"] = rel
    return doc
