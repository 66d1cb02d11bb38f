"""The generated robustness criteria: one test per zoo entry and criterion (SPEC §10).

Failures state the measured number and the threshold.  A crashing defense fails that entry's tests
(it is computed inside the test, not in a fixture), so the rest of the session goes on.
"""

from __future__ import annotations

import math

import pytest


def _ok(row: dict) -> dict:
    if row.get("error") and row.get("error_source") == "testbed":
        pytest.fail(f"testbed error on this model (a failure of segbackdoor itself, not of the defense): {row['error']}",
                    pytrace=False)
    if row.get("error"):
        pytest.fail(f"the defense crashed on this model: {row['error']}", pytrace=False)
    return row


def _metric(part: dict | None, key: str) -> float | None:
    value = (part or {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def test_asr(zoo_entry, score, suite_settings):
    """After the defense, ASR ≤ --max-asr (benign entries have no backdoor and pass when they run)."""
    row = _ok(score(zoo_entry))
    asr = _metric(row.get("after"), "ASR")
    if asr is None:
        assert zoo_entry.is_benign or _metric(row.get("before"), "ASR") is None, "no ASR measured after the defense"
        return
    assert asr <= suite_settings.max_asr, (
        f"ASR after {suite_settings.defense} is {asr:.1f}% > max {suite_settings.max_asr:g}% "
        f"(before: {_metric(row.get('before'), 'ASR')}%)")


def test_miou_drop(zoo_entry, score, suite_settings):
    """The defense costs at most --max-miou-drop points of benign mIoU."""
    row = _ok(score(zoo_entry))
    before, after = _metric(row.get("before"), "mIoU-B"), _metric(row.get("after"), "mIoU-B")
    if after is None:
        return  # a detection-only defense leaves the model as it is
    drop = before - after
    assert drop <= suite_settings.max_miou_drop, (
        f"mIoU-B dropped by {drop:.2f} points ({before:.1f}% → {after:.1f}%) > max {suite_settings.max_miou_drop:g}")


def test_within_budget(zoo_entry, score, suite_settings):
    """The defense finishes within --budget seconds."""
    row = _ok(score(zoo_entry))
    if suite_settings.budget_s is None:
        pytest.skip("no --budget given")
    seconds = float((row.get("cost") or {}).get("seconds", 0.0))
    assert seconds <= suite_settings.budget_s, f"took {seconds:.1f}s > budget {suite_settings.budget_s:g}s"


@pytest.mark.benign_only
def test_no_crash_on_benign(zoo_entry, score):
    """A defense must run on clean models too (most deployed models are clean)."""
    _ok(score(zoo_entry))


def _numbers(value, prefix=""):
    """Flatten the numbers and booleans of a (nested) result part into {path: value}."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(value, (int, float, bool)) and not (isinstance(value, float) and math.isnan(value)):
        return {prefix.rstrip("."): value}
    return {}


def test_deterministic(zoo_entry, score):
    """Same seed ⇒ same result (after-scores, detection, verdict and flagged samples)."""
    first, second = _ok(score(zoo_entry)), _ok(score(zoo_entry, run=1))
    compared = 0
    for part in ("after", "detection", "verdict", "flagged"):
        a, b = _numbers(first.get(part) or {}), _numbers(second.get(part) or {})
        for key in sorted(set(a) | set(b)):
            assert a.get(key) == b.get(key), (
                f"{part}.{key} differs between two runs with the same seed: {a.get(key)} vs {b.get(key)}")
            compared += 1
    assert compared, "the defense returned nothing comparable (no repaired model, filter, verdict or flagged samples)"
