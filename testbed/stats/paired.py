"""Paired comparison of two defenses on the models both ran on, or of one defense against doing nothing.

Pairing by model removes the model-to-model spread (some backdoors are simply harder) from the comparison,
which is what makes a difference of a few points detectable with 18 models.  Each model is one unit; models
of the same attack setting (different seeds) are treated as independent, which docs/metrics.md states.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from testbed.core.errors import UserError
from testbed.stats.intervals import LEVEL, mean_interval, sign_flip_pvalue
from testbed.stats.rows import defenses_in, identify, metric_value, resolve_defense

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
    """A − B per shared model for DER, ASR after and mIoU-B after: mean, t-interval, exact sign-flip p, and
    :func:`reconcile`'s ``p_min`` and ``note`` (too few models for the test; interval and test disagreeing).

    ``b = "none"`` compares ``a`` against doing nothing (after = before, DER = 0.5).  Models are matched by id;
    a model where either defense failed, or a metric is null, is left out of that metric (its ``n`` says how
    many pairs remain; with none, ``why`` says why in words).  ``seed`` only matters beyond 20 models (Monte Carlo
    sign patterns).
    """
    rows = identify(rows)
    names = defenses_in(rows)
    if NONE in names:
        raise UserError(f"the report has a defense named {NONE!r}, which is the name of the no-defense baseline; "
                        "rename that defense and rerun the bench")
    a, b = (n if n == NONE else resolve_defense(rows, n, flag, " (or none)") for n, flag in ((a, "--defense"), (b, "--vs")))
    if a == b:
        raise UserError(f"--defense and --vs are both {a!r}; compare two different defenses, or --vs none")
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
        stat = {**mean_interval(diffs, level), "p": p, "test": method}
        metrics[name] = {**stat, **reconcile(stat, diffs, level), "mean_a": mean_interval([x for x, _ in pairs])["mean"],
                         "mean_b": mean_interval([y for _, y in pairs])["mean"]}
        if not pairs:
            metrics[name]["why"] = why_no_pairs(name, [(ra[m], rb[m]) for m in shared])
    if all(m["n"] == 0 for m in metrics.values()):
        raise UserError(f"defenses {a!r} and {b!r} share {len(shared)} model(s) but neither DER nor after-scores "
                        "for both (a verdict-only defense does not change the model; failed runs have no scores)")
    failed = sum(1 for m in shared if ra[m].get("error") or rb[m].get("error"))
    return {"a": a, "b": b, "models": len(shared), "failed": failed, "level": level, "seed": seed, "metrics": metrics}


# why a shared model has no pair of values for a metric, most telling first: (key, words for one model, sentence for all)
_MISSING = (
    ("failed", "one of the two defenses failed", "one of the two defenses failed on every model both ran on"),
    ("not implanted", "the attack did not implant (DER n/a)",
     "the attack did not implant on any model both defenses ran on (DER n/a: no backdoor to remove)"),
    ("no gain", "no gain over the zoo's benign model (DER n/a)",
     "no model both defenses ran on scores an ASR above the zoo's benign model on the same attacked test set "
     "(DER n/a: no backdoor is measured)"),
    ("benign", "no attacked test set (a benign model)",
     "every model both defenses ran on is benign (no attacked test set, so no ASR and no DER)"),
    ("no after", "no after-scores (a verdict-only defense)",
     "one of the two defenses left no after-scores on any model both ran on (a verdict does not change the model)"),
    ("null", "a null value", "the value is null on every model both defenses ran on"),
)


def _no_gain(row: dict[str, Any]) -> bool:
    """The model's ASR before reached ``--min-asr`` but not above its zoo's benign floor (a bench's ``benign_floor``)."""
    floor, asr = row.get("benign_floor"), (row.get("before") or {}).get("ASR")
    if not floor or asr is None:
        return False
    return float((row.get("settings") or {}).get("min_asr", 0)) <= float(asr) <= float(floor["ASR"])


def _missing(name: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """The key of :data:`_MISSING` that says why the pair (``a``, ``b``) of one model has no ``name`` values."""
    if a.get("error") or b.get("error"):
        return "failed"
    if name == "DER" and (a.get("attack_implanted") is False or b.get("attack_implanted") is False):
        return "no gain" if _no_gain(a) else "not implanted"
    if name != "mIoU-B_after" and (a.get("benign_model") is True or (a.get("before") or {}).get("ASR") is None):
        return "benign"
    if not a.get("after") or not b.get("after"):
        return "no after"
    return "null"


def why_no_pairs(name: str, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """Why no shared model has values of ``name`` for both defenses, as one clause: a sentence when one reason
    holds for every model, else the count per reason (``of the 4 models both defenses ran on: 2 ..., 2 ...``)."""
    counts = Counter(_missing(name, a, b) for a, b in pairs)
    words = {key: (one, every) for key, one, every in _MISSING}
    if len(counts) == 1:
        return words[next(iter(counts))][1]
    parts = [f"{counts[key]} {words[key][0]}" for key, _, _ in _MISSING if counts[key]]
    return f"of the {len(pairs)} models both defenses ran on: {', '.join(parts)}"


def smallest_p(n_nonzero: int) -> float:
    """The smallest two-sided p the sign-flip test can give with ``n_nonzero`` non-zero differences: the two
    all-same-sign patterns out of 2^n (a zero difference flips to itself and adds nothing)."""
    return 1.0 if n_nonzero < 1 else min(1.0, 2.0 ** (1 - n_nonzero))


def models_needed(alpha: float) -> int:
    """The fewest non-zero paired differences with which the sign-flip test can reach p < ``alpha``."""
    n = 1
    while smallest_p(n) >= alpha:
        n += 1
    return n


def reconcile(stat: dict[str, Any], diffs: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """``p_min`` (the test's smallest possible p here) and a ``note`` whenever interval and test could be misread
    together: too few models for the test to reject at 1 − ``level``, or a t-interval that excludes 0 beside a
    p that does not reject (or the reverse).  The test is the decision; the t-interval describes the spread
    and assumes normal differences."""
    alpha = 1 - level
    n_nonzero = sum(1 for d in diffs if d != 0)
    out: dict[str, Any] = {"p_min": smallest_p(n_nonzero) if stat["n"] else None, "note": None}
    if stat["n"] < 2 or stat["p"] is None:  # one pair: "no interval" already says it all
        return out
    if out["p_min"] >= alpha:
        out["note"] = (f"too few models for the test: with {n_nonzero} non-zero difference(s) its p cannot go below "
                       f"{out['p_min']:.3g}; p < {alpha:g} needs at least {models_needed(alpha)}")
    elif stat["lo"] is not None and (stat["lo"] > 0 or stat["hi"] < 0) != (stat["p"] < alpha):
        out["note"] = ("the t-interval and the sign-flip test disagree (the interval assumes normal differences); "
                       "read the test's p")
    return out


def compare_all(rows: Sequence[dict[str, Any]], *, seed: int = 0, level: float = LEVEL) -> list[dict[str, Any]]:
    """Every defense against 'none', then every pair of defenses (in report order) that can be compared."""
    rows = identify(rows)
    names = [n for n in defenses_in(rows) if n != NONE]
    pairs = [(n, NONE) for n in names] + [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    out = []
    for x, y in pairs:
        try:
            out.append(compare(rows, x, y, seed=seed, level=level))
        except UserError:
            continue  # no shared models or nothing to compare (e.g. a verdict-only defense): not a comparison
    return out
