"""Writers for `testbed defend` / `testbed bench` reports: results.json, results.csv, scores.csv, report.md, figures.

One row per model × defense (a :class:`~testbed.defense_row.DefenseRow`, see
:func:`testbed.defense_runner.run_defense`); JSON, CSV and markdown are written from each row's JSON form,
``scores.csv`` and figures from its typed arrays.  Callers write into the temporary directory of
:func:`testbed.atomic.atomic_dir`, so a report appears complete or not at all.  A figure that fails to draw
is the testbed's error: it is listed in ``results.json`` ``"figure_errors"`` and in report.md, and the
other files are still written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from testbed import atomic
from testbed.defense_row import DefenseRow, public_row
from testbed.defense_scoring import auroc
from testbed.jsonutil import jsonable
from testbed.scoring import SCORE_KEYS

RESULT_COLUMNS = (
    ["model", "attack", "benign_model", "defense", "kinds", "error"]
    + [f"before_{k}" for k in SCORE_KEYS]
    + [f"after_{k}" for k in SCORE_KEYS]
    + ["DER", "tpr", "fpr", "auroc", "threshold", "flagged_count", "flagged_precision", "flagged_recall",
       "verdict_backdoored", "verdict_score", "seconds", "forward_passes", "backward_passes", "retrain_seconds",
       "budget_s", "over_budget"]
)
SCORE_COLUMNS = ("split", "index", "score", "flagged", "model", "defense")


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_") or "x"


def verdict_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per defense, over the models it gave a verdict on: detection accuracy and AUROC (benign=0 vs backdoored=1)."""
    out = []
    for name in dict.fromkeys(r["defense"] for r in rows):
        vs = [r for r in rows if r["defense"] == name and r.get("verdict") and not r.get("error")]
        if not vs:
            continue
        truth = [0 if r.get("benign_model") else 1 for r in vs]
        said = [1 if r["verdict"]["backdoored"] else 0 for r in vs]
        scores = [r["verdict"]["score"] if r["verdict"]["score"] is not None else -math.inf for r in vs]
        out.append({
            "defense": name,
            "models": len(vs),
            "benign": truth.count(0),
            "backdoored": truth.count(1),
            "accuracy": sum(int(a == b) for a, b in zip(truth, said)) / len(vs),
            "tpr": (sum(s for t, s in zip(truth, said) if t) / truth.count(1)) if truth.count(1) else None,
            "fpr": (sum(s for t, s in zip(truth, said) if not t) / truth.count(0)) if truth.count(0) else None,
            "auroc": auroc(truth, scores),
        })
    return out


def _get(d: dict[str, Any] | None, key: str) -> Any:
    return None if not d else d.get(key)


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    det, fl, ver, cost = row.get("detection"), row.get("flagged"), row.get("verdict"), row.get("cost") or {}
    out = {
        "model": row["model"], "attack": row["attack"], "benign_model": row.get("benign_model"), "defense": row["defense"],
        "kinds": "+".join(row.get("kinds") or []), "error": row.get("error") or "",
    }
    for k in SCORE_KEYS:
        out[f"before_{k}"] = _get(row.get("before"), k)
        out[f"after_{k}"] = _get(row.get("after"), k)
    out.update({
        "DER": row.get("DER"), "tpr": _get(det, "tpr"), "fpr": _get(det, "fpr"), "auroc": _get(det, "auroc"),
        "threshold": _get(det, "threshold"), "flagged_count": _get(fl, "count"), "flagged_precision": _get(fl, "precision"),
        "flagged_recall": _get(fl, "recall"), "verdict_backdoored": _get(ver, "backdoored"), "verdict_score": _get(ver, "score"),
        "seconds": cost.get("seconds"), "forward_passes": cost.get("forward_passes"),
        "backward_passes": cost.get("backward_passes"), "retrain_seconds": cost.get("retrain_seconds"),
        "budget_s": cost.get("budget_s"), "over_budget": cost.get("over_budget"),
    })
    return {k: ("" if v is None else v) for k, v in out.items()}


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
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


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _error_cell(r: dict[str, Any]) -> str:
    if not r.get("error"):
        return ""
    return ("testbed error: " if r.get("error_source") == "testbed" else "error: ") + r["error"][:80]


def _errors_markdown(rows: Sequence[dict[str, Any]], figure_errors: Sequence[dict[str, Any]]) -> list[str]:
    """The Errors section: the defense's failures, then the testbed's own (named so: they are bugs to report)."""
    lines = [f"- {r['model']} × {r['defense']}" + (" (testbed error)" if r.get("error_source") == "testbed" else "")
             + f": `{r['error']}`" for r in rows if r.get("error")]
    lines += [f"- {e['model']} × {e['defense']} (testbed error, figure {e['figure']}): `{e['error']}`" for e in figure_errors]
    return ["", "## Errors", ""] + lines if lines else []


def markdown(rows: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, Any]], meta: dict[str, Any],
             figures: Sequence[str], figure_errors: Sequence[dict[str, Any]] = ()) -> str:
    parts = [f"# {meta.get('title', 'Defense benchmark')}", ""]
    for key in ("data", "zoo", "device", "seed", "budget_s"):
        if meta.get(key) is not None:
            parts.append(f"- {key}: `{meta[key]}`")
    parts += ["", "Scores in percent (benign test set: mIoU-B; attacked test set: ASR). DER = DER_seg "
              "= [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2. Filters: rejected inputs count as defended; TPR/FPR/AUROC "
              "over attacked vs benign test inputs. Retraining defenses: P/R of the flagged training samples.", "",
              "## Before / after", ""]
    body = []
    for r in rows:
        b, a, det, fl, ver, cost = (r.get("before") or {}), (r.get("after") or {}), r.get("detection") or {}, \
            r.get("flagged") or {}, r.get("verdict"), r.get("cost") or {}
        seconds = _fmt(cost.get("seconds"), 1) + (" (over budget)" if cost.get("over_budget") else "")
        body.append([
            r["model"], r["attack"], r["defense"], "+".join(r.get("kinds") or []) or "—",
            _fmt(b.get("ASR")), _fmt(a.get("ASR")), _fmt(b.get("mIoU-B")), _fmt(a.get("mIoU-B")), _fmt(r.get("DER"), 3),
            _fmt(det.get("tpr"), 3), _fmt(det.get("fpr"), 3), _fmt(det.get("auroc"), 3),
            f"{_fmt(fl.get('precision'), 2)} / {_fmt(fl.get('recall'), 2)} ({fl.get('count')})" if fl else "—",
            (f"{'backdoored' if ver['backdoored'] else 'clean'} ({_fmt(ver['score'])})" if ver else "—"),
            seconds, _error_cell(r),
        ])
    parts.append(_md_table(["model", "attack", "defense", "kind", "ASR before", "ASR after", "mIoU-B before",
                            "mIoU-B after", "DER", "TPR", "FPR", "AUROC", "flagged P / R (n)", "verdict", "seconds",
                            "error"], body))
    if verdicts:
        parts += ["", "## Verdicts across models", "",
                  _md_table(["defense", "models", "benign", "backdoored", "accuracy", "TPR", "FPR", "AUROC"],
                            [[v["defense"], v["models"], v["benign"], v["backdoored"], _fmt(v["accuracy"], 3),
                              _fmt(v["tpr"], 3), _fmt(v["fpr"], 3), _fmt(v["auroc"], 3)] for v in verdicts])]
    parts += _errors_markdown(rows, figure_errors)
    if figures:
        parts += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(parts) + "\n"


def draw_figures(fig_dir: Path, rows: Sequence[DefenseRow],
                 classes: dict[str, Sequence[str]]) -> tuple[list[Path], list[dict[str, Any]]]:
    """Panels + bars per model, then every per-row figure (:data:`testbed.plots.ROW_FIGURES`) of each row.

    Returns the figures drawn and the testbed's failures to draw one (model, defense, figure, error)."""
    from testbed import plots

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


def results_document(rows: Sequence[DefenseRow | dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    public = [public_row(r) for r in rows]
    return {
        "format": "segbackdoor-bench",
        "version": 1,
        "meta": jsonable({k: v for k, v in meta.items() if k != "title"}),
        "rows": public,
        "verdicts": verdict_summary(public),
    }


def write_report(out_dir: str | Path, rows: Sequence[DefenseRow], *, meta: dict[str, Any],
                 classes: dict[str, Sequence[str]], figures: bool = True) -> dict[str, Any]:
    """Write every report file into ``out_dir`` (already created; normally an atomic_dir temp). Returns results.json
    (plus ``"figures"``, the figure paths relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    figs, figure_errors = draw_figures(out_dir / "figures", rows, classes) if figures else ([], [])
    doc = results_document(rows, meta)
    if figure_errors:
        doc["figure_errors"] = figure_errors
    public = doc["rows"]
    atomic.write_text(out_dir / "results.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic.write_text(out_dir / "results.csv", _csv_text(RESULT_COLUMNS, [csv_row(r) for r in public]))
    atomic.write_text(out_dir / "scores.csv", _csv_text(SCORE_COLUMNS, scores_rows(rows)))
    rel = [str(p.relative_to(out_dir)) for p in figs]
    atomic.write_text(out_dir / "report.md", markdown(public, doc["verdicts"], meta, rel, figure_errors))
    doc["figures"] = rel
    return doc
