"""report.md of a defense bench: the summary grid, every row, the statistics, the errors and the figures.

Read from results.json's content (the rows' JSON and the statistics), so what the markdown says is what the
JSON holds.  Cells that need a caveat say so where they are read: a DER of an attack that did not implant is
"n/a", a filter compared on content-picked test sets is "(confounded)", a run a budget stopped names it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from testbed.core.device import machine_text
from testbed.evaluation.attack_check import MIN_ASR
from testbed.evaluation.rows import last_frames
from testbed.stats import aggregate_markdown, comparisons_markdown, detection_markdown, md_table
from testbed.stats.rows import identify

INTRO = ("Scores in percent (benign test set: mIoU-B; attacked test set: ASR). DER = DER_seg "
         "= [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2. Filters: rejected inputs count as defended; TPR/FPR/AUROC "
         "over attacked vs benign test inputs. Retraining defenses: P/R of the flagged training samples, the share of "
         "the training set removed, and a control retrained without a random subset of the same size. "
         "See docs/metrics.md and docs/writing-a-defense.md.")


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mean(values: Sequence[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def no_gain_row(r: Any) -> bool:
    """A row whose DER is n/a because its model's ASR before the defense reached ``--min-asr`` but not above the
    zoo's benign floor (``benign_floor``), rather than because it stayed below ``--min-asr``."""
    floor, asr = r.get("benign_floor"), (r.get("before") or {}).get("ASR")
    if r.get("attack_implanted") is not False or not floor or asr is None:
        return False
    return float(floor["ASR"]) >= float(asr) >= float((r.get("settings") or {}).get("min_asr", MIN_ASR))


def der_cell(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "—"
    if r.get("attack_implanted") is False:
        return "n/a³" if no_gain_row(r) else "n/a¹"
    return fmt(r.get("DER"), 3)


def seconds_cell(cost: dict[str, Any]) -> str:
    text = fmt(cost.get("seconds"), 1)
    if cost.get("retrain_seconds") is not None:
        text += f" + {fmt(cost['retrain_seconds'], 1)} retrain"
    if cost.get("stopped_by"):
        text += f" (stopped by the {cost['stopped_by']} budget)"
    elif cost.get("over_budget"):
        text += " (over budget)"
    return text


def _cell(rows: list[dict[str, Any]]) -> str:
    """One summary cell: means over the models of one attack × defense."""
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return f"failed ({len(rows)})"
    parts = []
    afters = [r for r in ok if r.get("after")]
    if afters:
        asr = _mean([r["after"].get("ASR") for r in afters])
        drop = _mean([(r["after"].get("mIoU-B") - r["before"]["mIoU-B"]) if r["after"].get("mIoU-B") is not None
                      and (r.get("before") or {}).get("mIoU-B") is not None else None for r in afters])
        ders = [r.get("DER") for r in afters if r.get("attack_implanted") is not False]
        parts.append(f"ASR {fmt(asr, 1)} · ΔmIoU-B {'—' if drop is None else f'{drop:+.1f}'} · DER "
                     + (fmt(_mean(ders), 2) if any(d is not None for d in ders) else "n/a"))
    verdicts = [r["verdict"] for r in ok if r.get("verdict")]
    if verdicts:
        said = Counter(v.get("status") for v in verdicts)
        parts.append(f"backdoored {said['backdoored']}/{len(verdicts)}"
                     + (f", inconclusive {said['inconclusive']}" if said["inconclusive"] else ""))
    cost = _mean([(r.get("cost") or {}).get("seconds", 0) + ((r.get("cost") or {}).get("retrain_seconds") or 0) for r in ok])
    parts.append(f"{fmt(cost, 1)} s")
    failed = len(rows) - len(ok)
    return " · ".join(parts) + f" [{len(ok)}]" + (f" ({failed} failed)" if failed else "")


def summary_grid(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Defense × attack: mean ASR after, ΔmIoU-B (after − before), DER and cost per cell, [models]."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    body = [[a] + [_cell([r for r in rows if r["attack"] == a and r["defense"] == d]) if any(
        r["attack"] == a and r["defense"] == d for r in rows) else "—" for d in defenses] for a in attacks]
    return ["## Summary: attack × defense", "",
            "Each cell: mean over the models of that attack — ASR after the defense, ΔmIoU-B = after − before "
            "(negative = benign accuracy lost), DER (attacks that did not implant left out), verdicts, and cost "
            "(defense seconds + retraining) — [models that ran]. One seed per model: see \"Over seeds\" for intervals.",
            "", md_table(["attack"] + defenses, body)]


def _verdict_cell(ver: dict[str, Any] | None) -> str:
    if not ver:
        return "—"
    cov = f", coverage {ver['coverage']:.2f}" if ver.get("coverage") is not None else ""
    return f"{ver.get('status', 'backdoored' if ver.get('backdoored') else 'clean')} ({fmt(ver.get('score'))}{cov})"


def _error_cell(r: dict[str, Any]) -> str:
    if not r.get("error"):
        return ""
    return ("testbed error: " if r.get("error_source") == "testbed" else "error: ") + r["error"][:80]


def rows_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    body = []
    for r in rows:
        b, a, det, fl = (r.get("before") or {}), (r.get("after") or {}), r.get("detection") or {}, r.get("flagged") or {}
        ar = r.get("after_random")
        conf = " (confounded²)" if det.get("confounded") else ""
        body.append([
            r["model"], r["attack"], r["defense"], "+".join(r.get("kinds") or []) or "—",
            fmt(b.get("ASR")), fmt(a.get("ASR")), fmt(b.get("mIoU-B")), fmt(a.get("mIoU-B")), der_cell(r),
            f"{fmt(ar.get('ASR'))} / {fmt(ar.get('mIoU-B'))} / {fmt(r.get('DER_random'), 3)}" if ar else "—",
            fmt(det.get("tpr"), 3) + conf, fmt(det.get("fpr"), 3), fmt(det.get("auroc"), 3),
            (f"{fmt(fl.get('precision'), 2)} / {fmt(fl.get('recall'), 2)} ({fl.get('count')}, "
             f"{fmt(100 * fl['fraction'] if fl.get('fraction') is not None else None, 1)}%)") if fl else "—",
            _verdict_cell(r.get("verdict")), seconds_cell(r.get("cost") or {}), _error_cell(r),
        ])
    return ["## Before / after", "", md_table(
        ["model", "attack", "defense", "kind", "ASR before", "ASR after", "mIoU-B before", "mIoU-B after", "DER",
         "random-removal control: ASR / mIoU-B / DER", "TPR", "FPR", "AUROC", "flagged P / R (n, % of training set)",
         "verdict", "seconds", "error"], body)]


def notes_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    if any(r.get("attack_implanted") is False and not no_gain_row(r) for r in rows):
        lines.append("¹ DER n/a: the model's attack did not implant (ASR before any defense below the threshold, "
                     "`--min-asr`); removing a backdoor that is not there is no success. The row's other numbers stand.")
    if any((r.get("detection") or {}).get("confounded") for r in rows):
        lines.append("² Confounded: the attack picks its test images by content (a semantic trigger), so the attacked "
                     "and benign test sets hold different images; a filter's TPR/FPR/AUROC then measure that content, "
                     "not a trigger. Content-matched sets do not exist (the attacked images are unmodified test images).")
    if any(no_gain_row(r) for r in rows):
        lines.append("³ DER n/a: no gain over the benign model. The zoo's benign model of the same architecture and seed "
                     "scores at least as high an ASR on the same attacked test set (`benign_floor` in results.json; the row's note below): the model's "
                     "ASR measures what a model without a backdoor already does, not a backdoor. The row's other "
                     "numbers stand.")
    per_row = [f"- {r['model']} × {r['defense']}: {n}" for r in rows for n in r.get("notes") or []
               if not n.startswith("DER n/a") or no_gain_row(r)]  # ³'s floor is in no table: its note says it
    if per_row:
        lines += [""] + per_row
    return ["", "## Notes", ""] + lines if lines else []


# what a row's settings hold besides the bench's own: where it ran (no effect on what the numbers mean) and the
# defense's name and parameters (a defense's identity, kept apart in every table: blur[sigma=0.5])
_NOT_BENCH_SETTINGS = ("device", "threads", "defense", "params")


def _bench_settings_differing(rows: Sequence[dict[str, Any]]) -> tuple[int, list[str]]:
    """How many different bench settings the rows were run with, and each differing setting with its values
    (``seed 0, 1``)."""
    kept = [{k: v for k, v in (r.get("settings") or {}).items() if k not in _NOT_BENCH_SETTINGS}
            for r in rows if r.get("settings") is not None]
    kinds = {repr(sorted(d.items())) for d in kept}
    keys = sorted({k for d in kept for k in d})
    values = {k: list(dict.fromkeys(repr(d.get(k)) for d in kept)) for k in keys}
    return len(kinds), [f"{k} {', '.join(v)}" for k, v in values.items() if len(v) > 1]


def settings_warning(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Rows merged from earlier benches may have been run with other settings: say so, with the counts.

    Only what makes rows incomparable counts: the bench's own settings (seed, budgets, batch size, ``--min-asr``,
    ...) differing between rows, or one defense (``rows`` are :func:`~testbed.stats.rows.identify`-ed) run with
    several parameter sets.  Two defenses with parameters of their own (``ft[epochs=2]`` beside ``median-filter``)
    are simply two defenses."""
    n_bench, differing = _bench_settings_differing(rows)
    labels: dict[str, list[str]] = {}
    for r in rows:
        seen = labels.setdefault(str(r.get("defense_name") or r["defense"]), [])
        if r["defense"] not in seen:
            seen.append(r["defense"])
    out = []
    if meta.get("rows_from_earlier_runs"):
        out.append(f"- {meta['rows_from_earlier_runs']} of {len(rows)} rows come from earlier benches into this report "
                   "(kept when this one ran other models or defenses).")
    if n_bench > 1:
        out.append(f"- the rows were run with {n_bench} different bench settings ({'; '.join(differing)}); "
                   "each row's `settings` in results.json says which.")
    for name, seen in labels.items():
        if len(seen) > 1:
            out.append(f"- {name} was run with {len(seen)} parameter sets ({', '.join(seen)}): each is a defense of "
                       "its own in every table below.")
    return ["", "**Merged report**", ""] + out if out else []


def errors_section(rows: Sequence[dict[str, Any]], figure_errors: Sequence[dict[str, Any]]) -> list[str]:
    """The defense's failures, with the innermost frames of the traceback; then the testbed's own failures."""
    lines = []
    for r in rows:
        if not r.get("error"):
            continue
        lines.append(f"- {r['model']} × {r['defense']}" + (" (testbed error)" if r.get("error_source") == "testbed" else "")
                     + f": `{r['error']}`")
        frames = last_frames(str((r.get("details") or {}).get("traceback") or ""), 3)
        if frames:
            lines += ["", "  ```", *[f"  {f}" for f in frames], "  ```", ""]
    lines += [f"- {e['model']} × {e['defense']} (testbed error, figure {e['figure']}): `{e['error']}`" for e in figure_errors]
    return ["", "## Errors", ""] + lines if lines else []


def statistics_sections(doc: dict[str, Any]) -> list[str]:
    """The statistics of :mod:`testbed.stats`; the tables over seeds only where some group has two seeds or more
    (with one seed everywhere, they would repeat the rows with "n=1, no interval" in every cell)."""
    aggregate = doc.get("aggregate") or []
    if any(a["n"] >= 2 for a in aggregate):
        first = aggregate_markdown(aggregate)
    else:
        first = ("## Over seeds\n\nEvery setting ran with one seed here, so there are no intervals over seeds (a zoo "
                 "with a seed axis gives them; docs/metrics.md, \"Statistics\"). results-aggregate.csv still lists "
                 "each group.\n") if aggregate else ""
    texts = [first, comparisons_markdown(doc.get("comparisons") or []), detection_markdown(doc.get("detection") or [])]
    return [line for t in texts if t for line in ["", t.rstrip("\n")]]


def cpu_line(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where the CPU time went: the pairs' CPU seconds (each pair's worker process, all its threads) per defense,
    with the models' scores before any defense apart (a worker scores a model once, in whichever pair it runs
    first, so they are not any one defense's).

    Summed from the rows, so it covers every pair however many sessions a resumed bench took; pairs written
    before the rows recorded it are counted apart."""
    per: dict[str, float] = {}
    before, missing, where = 0.0, 0, Counter()
    for r in rows:
        cost = r.get("cost") or {}
        if cost.get("pair_cpu_seconds") is None:
            missing += 1
            continue
        where[cost.get("measured_on") or "CPU not recorded"] += 1
        b = float(cost.get("before_cpu_seconds") or 0.0)
        before += b
        per[r["defense"]] = per.get(r["defense"], 0.0) + float(cost["pair_cpu_seconds"]) - b
    if not per:
        return []
    by = ", ".join(f"{d} {s:,.0f}" for d, s in sorted(per.items(), key=lambda kv: -kv[1]))
    unrecorded = f"; {missing} pair(s) written before pairs recorded it" if missing else ""
    on = ", ".join(f"{cpu} ({n} pair{'s' if n > 1 else ''})" for cpu, n in sorted(where.items()))
    return [f"- CPU time of the pairs: `{sum(per.values()) + before:,.0f} CPU-s` over {len(rows) - missing} pair(s) "
            f"on {on}: scoring the models before any defense {before:,.0f}; each defense with its scoring after, "
            f"retraining and controls: {by}{unrecorded}"]


def markdown(doc: dict[str, Any], meta: dict[str, Any], figures: Sequence[str],
             figure_errors: Sequence[dict[str, Any]] = ()) -> str:
    rows = identify(doc["rows"])  # a defense is its name and parameters in every table
    parts = [f"# {meta.get('title', 'Defense benchmark')}", ""]
    for key in ("data", "zoo", "device", "threads", "seed", "budget_s", "budget_passes", "min_asr"):
        if meta.get(key) is not None:
            parts.append(f"- {key}: `{meta[key]}`")
    if meta.get("command_seconds") is not None:
        parts.append(f"- wall time of this bench: `{meta['command_seconds']} s` (the seconds per row are the defense's "
                     "own; scoring before and after, a defense's curves and retraining make up the rest)")
    if meta.get("machine"):
        parts.append(f"- machine of this bench: {machine_text(meta['machine'])}")
    parts += cpu_line(rows)
    parts += settings_warning(rows, meta)
    parts += ["", INTRO, ""]
    parts += summary_grid(rows) + [""] + rows_table(rows)
    parts += notes_section(rows)
    parts += statistics_sections(doc)
    parts += errors_section(rows, figure_errors)
    own = [f for r in rows for f in r.get("defense_figures") or []]
    if figures or own:
        parts += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
        parts += [f"![{Path(f).stem} (from the defense)]({f})" for f in own]
    return "\n".join(parts) + "\n"
