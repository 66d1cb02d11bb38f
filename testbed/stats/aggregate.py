"""Aggregation over seeds: one entry per (group, defense), each metric's mean, sample std and 95% t-interval.

A group is every zoo grid axis except seed (model, attack label with its rate/trigger, training axes), so the
seeds of one setting are pooled and nothing else is.  The per-seed rows stay in the report beside this.
"""

from __future__ import annotations

from typing import Any, Sequence

from testbed.stats.intervals import LEVEL, mean_interval
from testbed.stats.rows import METRICS, REQUIRED_METRICS, group_key, identify, metric_value, row_group, row_seed


def aggregate(rows: Sequence[dict[str, Any]], level: float = LEVEL) -> list[dict[str, Any]]:
    """``[{"group", "defense", "n", "errors", "seeds", "stats": {METRIC: {"n", "mean", "std", "lo", "hi"}}}]``.

    ``n`` counts the rows of the group that ran without error; ``errors`` the rows that failed (excluded from
    every metric).  Each metric has its own ``n``: a null value (no attacked test set, a verdict-only
    defense's "after") is left out of that metric, never counted as 0.  The required metrics are always
    present (``n`` = 0 and nulls when no row has them); the others (filter and flagging figures) only when
    some row of the group has a value.  Order: groups and defenses as they first appear in ``rows``.
    """
    buckets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    groups: dict[str, dict[str, Any]] = {}
    for row in identify(rows):  # a defense is its name and parameters
        group = row_group(row)
        key = group_key(group)
        groups.setdefault(key, group)
        buckets.setdefault((key, str(row.get("defense"))), []).append(row)
    out = []
    for (key, defense), members in buckets.items():
        ok = [r for r in members if not r.get("error")]
        stats = {}
        for name in METRICS:
            values = [metric_value(r, name) for r in ok]
            if name in REQUIRED_METRICS or any(v is not None for v in values):
                stats[name] = mean_interval(values, level)
        seeds = sorted({s for s in (row_seed(r) for r in ok) if s is not None})
        out.append({"group": groups[key], "defense": defense, "n": len(ok), "errors": len(members) - len(ok),
                    "seeds": seeds, "stats": stats})
    return out
