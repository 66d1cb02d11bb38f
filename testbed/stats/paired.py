"""Paired comparison of two defenses on the models both ran on, or of one defense against doing nothing.

Pairing by model removes the model-to-model spread (some backdoors are simply harder) from the comparison,
which is what makes a difference of a few points detectable with 18 models.  Each model is one unit; models
of the same attack setting (different seeds) are treated as independent, which docs/metrics.md states.
"""

from __future__ import annotations

from typing import Any, Sequence

from testbed.core.errors import UserError
from testbed.stats.intervals import LEVEL, mean_interval, sign_flip_pvalue
from testbed.stats.rows import defenses_in, metric_value

NONE = "none"  # the "no defense" baseline: after = before
NO_DEFENSE_DER = 0.5  # DER_seg(before, before) = [0 - 0 + 1] / 2 (testbed.scoring.metrics.der_seg)
PAIRED_METRICS = ("DER", "ASR_after", "mIoU-B_after")


def _by_model(rows: Sequence[dict[str, Any]], defense: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if str(r.get("defense")) != defense:
            continue
        model = str(r.get("model"))
        if model in out:
            raise UserError(f"model {model!r} appears twice for defense {defense!r}; a report holds one row per "
                            "model and defense (merge reports by model, not by appending)")
        out[model] = r
    return out


def no_defense_row(row: dict[str, Any]) -> dict[str, Any]:
    """The baseline for one model: the scores before any defense, as if they were the scores after it."""
    before = row.get("before") or {}
    has_der = before.get("ASR") is not None and before.get("mIoU-B") is not None
    return {"model": row.get("model"), "defense": NONE, "before": before, "after": before,
            "DER": NO_DEFENSE_DER if has_der else None, "error": None}


def _rows_of(rows: Sequence[dict[str, Any]], defense: str, models_of: str) -> dict[str, dict[str, Any]]:
    if defense == NONE:
        return {m: no_defense_row(r) for m, r in _by_model(rows, models_of).items()}
    return _by_model(rows, defense)


def compare(rows: Sequence[dict[str, Any]], a: str, b: str, *, seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """A − B per shared model for DER, ASR after and mIoU-B after: mean, t-interval, exact sign-flip p.

    ``b = "none"`` compares ``a`` against doing nothing (after = before, DER = 0.5).  Models are matched by id;
    a model where either defense failed, or a metric is null, is left out of that metric (its ``n`` says how
    many pairs remain).  ``seed`` only matters beyond 20 models (Monte Carlo sign patterns).
    """
    names = defenses_in(rows)
    if a == b:
        raise UserError(f"compare needs two different defenses, got {a!r} twice; name another defense or 'none'")
    if NONE in names:
        raise UserError(f"the report has a defense named {NONE!r}, which is the name of the no-defense baseline; "
                        "rename that defense and rerun the bench")
    for name in (a, b):
        if name != NONE and name not in names:
            raise UserError(f"defense {name!r} is not in the report; it has: {', '.join(names)} (or 'none')")
    if a == NONE:
        raise UserError("'none' (doing nothing) goes second: compare DEFENSE against none")
    ra, rb = _rows_of(rows, a, a), _rows_of(rows, b, a)
    shared = [m for m in ra if m in rb]
    if not shared:
        raise UserError(f"defenses {a!r} and {b!r} share no models ({a}: {len(ra)}, {b}: {len(rb)}); "
                        "a paired comparison needs both to have run on the same models")
    metrics = {}
    for name in PAIRED_METRICS:
        va = [metric_value(ra[m], name) for m in shared]
        vb = [metric_value(rb[m], name) for m in shared]
        pairs = [(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
        diffs = [x - y for x, y in pairs]
        p, method = sign_flip_pvalue(diffs, seed=seed)
        metrics[name] = {**mean_interval(diffs, level), "p": p, "test": method,
                         "mean_a": mean_interval([x for x, _ in pairs])["mean"],
                         "mean_b": mean_interval([y for _, y in pairs])["mean"]}
    if all(m["n"] == 0 for m in metrics.values()):
        raise UserError(f"defenses {a!r} and {b!r} share {len(shared)} model(s) but neither DER nor after-scores "
                        "for both (a verdict-only defense does not change the model; failed runs have no scores)")
    failed = sum(1 for m in shared if ra[m].get("error") or rb[m].get("error"))
    return {"a": a, "b": b, "models": len(shared), "failed": failed, "level": level, "seed": seed, "metrics": metrics}


def compare_all(rows: Sequence[dict[str, Any]], *, seed: int = 0, level: float = LEVEL) -> list[dict[str, Any]]:
    """Every defense against 'none', then every pair of defenses (in report order) that can be compared."""
    names = [n for n in defenses_in(rows) if n != NONE]
    pairs = [(n, NONE) for n in names] + [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    out = []
    for x, y in pairs:
        try:
            out.append(compare(rows, x, y, seed=seed, level=level))
        except UserError:
            continue  # no shared models or nothing to compare (e.g. a verdict-only defense): not a comparison
    return out
