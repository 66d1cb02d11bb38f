"""Text forms of the statistics: report.md sections, results-aggregate.csv, and `testbed compare` lines.

Every interval is printed as it was computed; a metric with one value says "n=1, no interval" and one with
none prints "—", so a reader never mistakes a single seed for an estimate with an error bar.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from testbed.stats.rows import METRICS, PERCENT_METRICS

NO_INTERVAL = "n=1, no interval"
MINUS = "\u2212"


def md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def digits(metric: str) -> int:
    """Percent metrics to 2 decimals, fractions (DER, rates) to 3."""
    return 2 if metric in PERCENT_METRICS else 3


def mean_pm(stat: dict[str, Any] | None, nd: int) -> str:
    """``mean ± half-width [n]``; ``mean [n=1, no interval]``; ``—`` without values."""
    if not stat or not stat.get("n"):
        return "—"
    if stat.get("lo") is None:
        return f"{stat['mean']:.{nd}f} [{NO_INTERVAL}]"
    half = (stat["hi"] - stat["lo"]) / 2
    return f"{stat['mean']:.{nd}f} ± {half:.{nd}f} [{stat['n']}]"


def _signed(v: float, nd: int) -> str:
    return (f"+{v:.{nd}f}" if v >= 0 else f"{MINUS}{-v:.{nd}f}")


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.2g}" if p < 0.01 else f"{p:.3f}".rstrip("0").rstrip(".")


def p_text(stat: dict[str, Any]) -> str:
    """``p=0.031`` (exact sign-flip) or ``p≈0.0012 (Monte Carlo)`` (sampled sign patterns, beyond 20 models)."""
    if stat.get("test") == "monte-carlo":
        return f"p\u2248{_p(stat['p'])} (Monte Carlo)"
    return f"p={_p(stat['p'])}"


def _axes(aggregates: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for a in aggregates for k in a["group"]))


def aggregate_markdown(aggregates: Sequence[dict[str, Any]]) -> str:
    """One table per defense: rows = groups, cells = ``mean ± half-width [n]`` of the 95% t-interval."""
    if not aggregates:
        return ""
    parts = ["## Over seeds", "",
             "Mean ± half-width of the 95% t-interval over seeds [number of seeds with a value]; "
             f"\"{NO_INTERVAL}\" where a group has one seed. See docs/metrics.md, \"Statistics\"."]
    for defense in dict.fromkeys(a["defense"] for a in aggregates):
        mine = [a for a in aggregates if a["defense"] == defense]
        metrics = [m for m in METRICS if any((a["stats"].get(m) or {}).get("n") for a in mine)]
        if not metrics:
            continue  # e.g. a defense that failed everywhere
        axes = _axes(mine)
        body = [[a["group"].get(k, "—") for k in axes] + [a["n"], a["errors"]]
                + [mean_pm(a["stats"].get(m), digits(m)) for m in metrics] for a in mine]
        parts += ["", f"### {defense}", "", md_table(axes + ["n", "failed"] + metrics, body)]
    return "\n".join(parts) + "\n"


def aggregate_csv(aggregates: Sequence[dict[str, Any]]) -> str:
    """results-aggregate.csv: group axes, defense, n, errors, seeds, then METRIC_{n,mean,std,lo,hi} per metric."""
    axes = _axes(aggregates)
    columns = axes + ["defense", "n", "errors", "seeds"] + [f"{m}_{k}" for m in METRICS for k in ("n", "mean", "std", "lo", "hi")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for a in aggregates:
        row: dict[str, Any] = {k: a["group"].get(k, "") for k in axes}
        row.update(defense=a["defense"], n=a["n"], errors=a["errors"], seeds=";".join(str(s) for s in a["seeds"]))
        for m in METRICS:
            s = a["stats"].get(m) or {}
            for k in ("n", "mean", "std", "lo", "hi"):
                v = s.get(k)
                row[f"{m}_{k}"] = "" if v is None else (repr(float(v)) if k != "n" else v)
        w.writerow(row)
    return buf.getvalue()


def difference_text(stat: dict[str, Any], metric: str, unit: str = "") -> str:
    """``+0.210 [0.120, 0.300], n=18 models, p=0.002`` (or ``n=1 model, no interval``)."""
    nd = digits(metric)
    if not stat["n"]:
        return f"no pairs with values \u2014 {stat['why']}" if stat.get("why") else "no pairs with values"
    models = f"n={stat['n']} model{'s' if stat['n'] != 1 else ''}"
    note = f" ({stat['note']})" if stat.get("note") else ""
    if stat["lo"] is None:
        return f"{_signed(stat['mean'], nd)}{unit}, {models}, no interval{note}"
    return (f"{_signed(stat['mean'], nd)}{unit} [{_signed(stat['lo'], nd)}, {_signed(stat['hi'], nd)}], "
            f"{models}, {p_text(stat)}{note}")


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """`testbed compare`'s answer: one line per metric, A − B."""
    head = f"{result['a']} {MINUS} {result['b']}"
    out = []
    for metric, stat in result["metrics"].items():
        unit = " pp" if metric in PERCENT_METRICS else ""
        sep = ":" if not stat["n"] else ""  # "DER: no pairs with values — why" reads as a sentence
        out.append(f"{head}: {metric}{sep} {difference_text(stat, metric, unit)}")
    return out


def comparisons_markdown(comparisons: Sequence[dict[str, Any]]) -> str:
    if not comparisons:
        return ""
    metrics = list(comparisons[0]["metrics"])
    body = [[f"{c['a']} {MINUS} {c['b']}", c["models"]] + [difference_text(c["metrics"][m], m) for m in metrics]
            for c in comparisons]
    return "\n".join([
        "## Paired comparisons", "",
        "Per-model differences A − B on the models both ran on (\"none\" = no defense: after = before, DER 0.5): "
        "mean [95% t-interval], models with a value for both, and the sign-flip test's two-sided p "
        "(exact up to 20 models, else Monte Carlo and marked so; uncorrected for the number of comparisons). "
        "The test decides; the t-interval describes the spread and assumes normal differences. With fewer than 6 "
        "models the test cannot reach p < 0.05, and the cell says so. DER: positive favours A; ASR after: negative favours A; "
        "mIoU-B after (percentage points): positive favours A.", "",
        md_table(["comparison", "shared models"] + metrics, body)]) + "\n"


def _rate_text(r: dict[str, Any]) -> str:
    if r.get("value") is None:
        return "—"
    return f"{r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] ({r['k']}/{r['n']})"


def detection_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    if not summaries:
        return ""
    body = []
    for s in summaries:
        au = s["auroc"]
        auroc = "—" if au["value"] is None else f"{au['value']:.3f} [{au['lo']:.3f}, {au['hi']:.3f}]"
        inc = s["inconclusive"]
        d = s["detected"]
        body.append([s["defense"], s["benign"], s["backdoored"], f"{inc['benign']} / {inc['backdoored']}",
                     _rate_text(s["accuracy"]), _rate_text(s["tpr"]), _rate_text(s["fpr"]), auroc,
                     d["right_target"], d["wrong_target"], d["target_not_named"], d["no_single_target"], s["errors"]])
    return "\n".join([
        "## Detection across models", "",
        "Verdicts over benign vs backdoored models. Rates over decided verdicts (inconclusive ones are counted "
        "apart, not as clean) with 95% Wilson intervals (k/n); AUROC of the verdict score with a 95% stratified "
        "bootstrap interval. Detected backdoors by target: right = a suspected target is the attack's target "
        "class; wrong = it is not; not named = no target given; no single target = BadNets (a whole label map).",
        "",
        md_table(["defense", "benign", "backdoored", "inconclusive (benign / backdoored)", "accuracy", "TPR", "FPR",
                  "AUROC", "right target", "wrong target", "target not named", "no single target", "failed"], body)]) + "\n"
