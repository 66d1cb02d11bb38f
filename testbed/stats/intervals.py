"""Interval estimates and the paired test behind every ± in a report.

Why these methods (docs/metrics.md, "Statistics", says the same for users):

- **t-interval** for a mean over seeds or models: with n = 3 seeds a bootstrap has only 10 distinct
  resamples and its percentile interval is far too narrow; the t-interval is exact under normal noise and
  widens honestly with few samples (t = 4.30 for n = 3).  n < 2 has no interval: ``lo``/``hi``/``std`` are None.
- **Wilson** interval for a proportion (TPR, FPR, accuracy): stays inside [0, 1] and keeps its coverage at
  the small counts a zoo has (3 benign models), where the normal ("Wald") interval collapses to a point at 0 or 1.
- **Exact sign-flip permutation test** for paired differences: it tests the same quantity the interval is
  about (the mean difference), needs no normality, handles zero differences (two identical defenses give
  p = 1 instead of an error), and is exact: all 2^n sign patterns for n <= ``EXACT_MAX``, a seeded Monte
  Carlo beyond.  No paired test can reach p < 0.25 with n = 3 (2 of the 8 sign patterns are as extreme as
  the data), so comparisons pair over *models* (18 in the reference zoo), not over seeds.
- **Stratified percentile bootstrap** for AUROC: resampling benign and backdoored models separately keeps
  both classes present in every resample, the interval stays in [0, 1], ties are handled like the point
  estimate, and a seed makes it reproducible.  It collapses to [1, 1] under perfect separation; that is
  reported with the class counts, which say how much such an interval is worth.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats
from scipy.stats import rankdata

LEVEL = 0.95
EXACT_MAX = 20  # sign-flip: enumerate all 2^n patterns up to here (2^20 ≈ 1e6, well under a second)
MONTE_CARLO = 100_000  # sign patterns drawn beyond EXACT_MAX
BOOTSTRAP = 2000  # AUROC resamples
_CHUNK = 1 << 16


def _finite(values: Sequence[Any]) -> np.ndarray:
    """The usable values: None and NaN dropped (an undefined metric is not a zero)."""
    out = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(out, dtype=np.float64)


def t_quantile(level: float, df: int) -> float:
    return float(stats.t.ppf(0.5 + level / 2, df))


def z_quantile(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def mean_interval(values: Sequence[Any], level: float = LEVEL) -> dict[str, Any]:
    """``{"n", "mean", "std", "lo", "hi"}`` of the non-null values: sample std (ddof=1), t-interval.

    n = 0: everything None; n = 1: the mean only (no spread can be estimated from one value).
    """
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "lo": None, "hi": None}
    std = float(x.std(ddof=1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for k successes in n trials; (None, None) when n = 0."""
    if n <= 0:
        return None, None
    z = z_quantile(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_flip_pvalue(diffs: Sequence[Any], seed: int = 0) -> tuple[float | None, str]:
    """Two-sided p of H0 "each paired difference is symmetric about 0", statistic |sum(d)|.

    Returns ``(p, method)`` with method ``"exact"`` or ``"monte-carlo"``; ``(None, "none")`` without data.
    Monte Carlo uses (1 + hits) / (1 + draws), which never returns 0 and keeps the test valid.
    """
    d = _finite(diffs)
    n = d.size
    if n == 0:
        return None, "none"
    observed = abs(float(d.sum()))
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # sums equal up to rounding count as ties
    if n <= EXACT_MAX:
        total = 1 << n
        hits = 0
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, _CHUNK):
            codes = np.arange(start, min(total, start + _CHUNK), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
        return hits / total, "exact"
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, MONTE_CARLO, _CHUNK):
        m = min(_CHUNK, MONTE_CARLO - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + MONTE_CARLO), "monte-carlo"


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """P(score of a positive > score of a negative) + half the ties (= sklearn's roc_auc_score); None if one class."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return None
    return float(_auc_batch(s[None, y], s[None, ~y])[0])


def _auc_batch(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (pos[b], neg[b]) from midranks (Mann-Whitney U / (n_pos n_neg))."""
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def auroc_interval(labels: Sequence[int], scores: Sequence[float], level: float = LEVEL, seed: int = 0,
                   resamples: int = BOOTSTRAP) -> tuple[float, float] | tuple[None, None]:
    """Stratified percentile bootstrap: resample positives and negatives separately, ``resamples`` times.

    The draws are, in order, ``rng.integers(0, n_pos, (resamples, n_pos))`` then
    ``rng.integers(0, n_neg, (resamples, n_neg))`` from ``numpy.random.default_rng(seed)``, so the interval
    can be recomputed independently; bounds are ``numpy.percentile`` (linear) at (1 ± level)/2.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, pos.size, (resamples, pos.size))
    ineg = rng.integers(0, neg.size, (resamples, neg.size))
    values = _auc_batch(pos[ip], neg[ineg])
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
