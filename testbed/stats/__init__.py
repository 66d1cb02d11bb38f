"""Statistics over bench rows: aggregation over seeds, paired comparisons, detection across a zoo.

Pure functions of the rows of a report's results.json (no model, no data, no torch), so a report can be
re-analysed later (`testbed compare`) and the bench report calls the same code.  Methods and why: the module
docstring of :mod:`testbed.stats.intervals` and docs/metrics.md, "Statistics".

For the bench report writer::

    stats = bench_statistics(rows)          # {"aggregate": [...], "comparisons": [...], "detection": [...]}
    doc.update(stats)                        # results.json keys beside "rows"
    text += statistics_markdown(stats)       # report.md sections
    write_text(out / "results-aggregate.csv", aggregate_csv(stats["aggregate"]))
"""

from __future__ import annotations

from typing import Any, Sequence

from testbed.stats.aggregate import aggregate
from testbed.stats.detection import detection_summary, true_targets
from testbed.stats.intervals import LEVEL, auroc, auroc_interval, mean_interval, sign_flip_pvalue, wilson_interval
from testbed.stats.paired import NONE, compare, compare_all
from testbed.stats.render import (aggregate_csv, aggregate_markdown, comparison_lines, comparisons_markdown,
                                  detection_markdown, md_table)
from testbed.stats.rows import METRICS, parse_entry_id, read_report, row_group, row_seed

__all__ = [
    "LEVEL", "METRICS", "NONE", "aggregate", "aggregate_csv", "aggregate_markdown", "auroc", "auroc_interval",
    "bench_statistics", "compare", "compare_all", "comparison_lines", "comparisons_markdown", "detection_markdown",
    "detection_summary", "md_table", "mean_interval", "parse_entry_id", "read_report", "row_group", "row_seed",
    "sign_flip_pvalue", "statistics_markdown", "true_targets", "wilson_interval",
]


def bench_statistics(rows: Sequence[dict[str, Any]], *, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The three results.json lists computed from the rows; ``seed`` drives the only random steps
    (AUROC bootstrap, Monte Carlo sign flips beyond 20 models)."""
    return {"aggregate": aggregate(rows), "comparisons": compare_all(rows, seed=seed),
            "detection": detection_summary(rows, seed=seed)}


def statistics_markdown(stats: dict[str, list[dict[str, Any]]]) -> str:
    """report.md sections for :func:`bench_statistics`' output (empty sections are left out)."""
    parts = [aggregate_markdown(stats.get("aggregate", [])), comparisons_markdown(stats.get("comparisons", [])),
             detection_markdown(stats.get("detection", []))]
    return "\n".join(p for p in parts if p)
