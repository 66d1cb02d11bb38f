"""The generated robustness criteria: one test per zoo entry and criterion, by result kind (docs/suites.md).

What a defense returns decides which criteria apply to it: a repaired model, retraining without flagged
samples and an input filter all change what the model outputs, so ASR and the mIoU-B drop are checked; a
filter is also checked for TPR and FPR; a verdict for flagging backdoored entries and clearing benign ones
(and, over the whole zoo, for accuracy and AUROC when asked).  A criterion that does not apply is skipped
with the reason, and so is one that needs a backdoor on an entry whose attack did not implant.

Failures are one line stating the measured number and the threshold.  A crashing defense fails that entry's
tests (it is computed inside the test, not in a fixture), so the rest of the session goes on.
"""

from __future__ import annotations

import math

import pytest

from testbed.stats import detection_summary


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _ok(row: dict) -> dict:
    if row.get("error") and row.get("error_source") == "testbed":
        _fail(f"testbed error on this model (a failure of segbackdoor itself, not of the defense): {row['error']}")
    if row.get("error"):
        frames = row.last_frames(1) if hasattr(row, "last_frames") else []
        _fail(f"the defense crashed on this model: {row['error']}" + (f" (at {frames[0]})" if frames else ""))
    return row


def _metric(part: dict | None, key: str) -> float | None:
    value = (part or {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _needs_kind(row: dict, settings, *kinds: str) -> None:
    got = row.get("kinds") or []
    if not set(kinds) & set(got):
        pytest.skip(f"{row.get('defense')} returned no {' or '.join(kinds)} (it returned: {', '.join(got) or 'nothing'})")


def _needs_backdoor(row: dict, entry) -> None:
    if entry.is_benign:
        pytest.skip("benign entry: no backdoor to remove or detect")
    if row.get("attack_implanted") is False:
        why = next((n for n in row.get("notes") or [] if "did not implant" in n), "the attack did not implant")
        pytest.skip(f"{entry.id}: {why.removeprefix('DER n/a: ')} (--min-asr)")


CHANGES_OUTPUT = ("repair", "retrain", "filter")


def test_asr(zoo_entry, score, suite_settings):
    """After a repair, retraining or filter, ASR ≤ --max-asr (rejected inputs count as defended)."""
    row = _ok(score(zoo_entry))
    _needs_kind(row, suite_settings, *CHANGES_OUTPUT)
    _needs_backdoor(row, zoo_entry)
    asr = _metric(row.get("after"), "ASR")
    if asr is None:
        pytest.skip("no attacked test set to measure ASR on")
    if asr > suite_settings.max_asr:
        _fail(f"ASR after {row['defense']} is {asr:.1f}% > max {suite_settings.max_asr:g}% "
              f"(before: {_metric(row.get('before'), 'ASR'):.1f}%)")


def test_miou_drop(zoo_entry, score, suite_settings):
    """A repair, retraining or filter costs at most --max-miou-drop points of benign mIoU."""
    row = _ok(score(zoo_entry))
    _needs_kind(row, suite_settings, *CHANGES_OUTPUT)
    before, after = _metric(row.get("before"), "mIoU-B"), _metric(row.get("after"), "mIoU-B")
    if before is None or after is None:
        pytest.skip("no benign test scores")
    drop = before - after
    if drop > suite_settings.max_miou_drop:
        _fail(f"mIoU-B dropped by {drop:.2f} points ({before:.1f}% → {after:.1f}%) > max {suite_settings.max_miou_drop:g}")


def test_filter_tpr(zoo_entry, score, suite_settings):
    """A filter rejects at least --min-tpr of the attacked test inputs."""
    row = _ok(score(zoo_entry))
    _needs_kind(row, suite_settings, "filter")
    _needs_backdoor(row, zoo_entry)
    det = row.get("detection") or {}
    if det.get("tpr") is None:
        pytest.skip("no attacked test inputs to filter")
    confounded = " (confounded: the attacked and benign test sets hold different images)" if det.get("confounded") else ""
    if det["tpr"] < suite_settings.min_tpr:
        _fail(f"{row['defense']} rejected {det['attacked_flagged']} of {det['attacked_total']} attacked inputs: "
              f"TPR {det['tpr']:.3f} < min {suite_settings.min_tpr:g}{confounded}")


def test_filter_fpr(zoo_entry, score, suite_settings):
    """A filter rejects at most --max-fpr of the benign test inputs (on benign and backdoored entries alike)."""
    row = _ok(score(zoo_entry))
    _needs_kind(row, suite_settings, "filter")
    det = row.get("detection") or {}
    if det.get("fpr") is None:
        pytest.skip("no benign test inputs")
    if det["fpr"] > suite_settings.max_fpr:
        _fail(f"{row['defense']} rejected {det['benign_flagged']} of {det['benign_total']} benign inputs: "
              f"FPR {det['fpr']:.3f} > max {suite_settings.max_fpr:g}")


def test_verdict(zoo_entry, score, suite_settings):
    """A verdict flags a backdoored entry as backdoored and clears a benign one (inconclusive fails both)."""
    row = _ok(score(zoo_entry))
    _needs_kind(row, suite_settings, "verdict")
    if not zoo_entry.is_benign:
        _needs_backdoor(row, zoo_entry)
    v = row.get("verdict") or {}
    want = "clean" if zoo_entry.is_benign else "backdoored"
    status = v.get("status")
    if status != want:
        extra = f", coverage {v['coverage']:.2f} (raise --budget/--budget-passes)" if status == "inconclusive" and \
            v.get("coverage") is not None else ""
        _fail(f"{row['defense']} says {status} (score {v.get('score')}{extra}) on a "
              f"{'benign' if zoo_entry.is_benign else 'backdoored'} entry; expected {want}")


def _detection(zoo, score, suite_settings) -> dict:
    rows = [score(e) for e in zoo]
    if not any("verdict" in (r.get("kinds") or []) for r in rows if not r.get("error")):
        pytest.skip(f"{suite_settings.defense} returned no verdict on any entry")
    found = detection_summary([r.to_json() if hasattr(r, "to_json") else r for r in rows], seed=suite_settings.seed)
    if not found:
        pytest.skip("no verdicts to score")
    return found[0]


def test_detection_accuracy(zoo, score, suite_settings):
    """Over the whole zoo, the verdicts' accuracy ≥ --min-detection-accuracy (only when that option is given)."""
    if suite_settings.min_accuracy is None:
        pytest.skip("no --min-detection-accuracy given")
    d = _detection(zoo, score, suite_settings)
    acc = d["accuracy"]
    if acc["value"] is None or acc["value"] < suite_settings.min_accuracy:
        _fail(f"detection accuracy {acc['k']}/{acc['n']} = {acc['value']} < min {suite_settings.min_accuracy:g} "
              f"(inconclusive: {sum(d['inconclusive'].values())})")


def test_detection_auroc(zoo, score, suite_settings):
    """Over the whole zoo, the AUROC of the verdict scores ≥ --min-detection-auroc (only when that option is given)."""
    if suite_settings.min_auroc is None:
        pytest.skip("no --min-detection-auroc given")
    au = _detection(zoo, score, suite_settings)["auroc"]
    if au["value"] is None:
        _fail(f"no AUROC: the zoo needs benign and backdoored entries with verdict scores "
              f"({au['n_benign']} benign, {au['n_backdoored']} backdoored)")
    if au["value"] < suite_settings.min_auroc:
        _fail(f"verdict AUROC {au['value']:.3f} < min {suite_settings.min_auroc:g} "
              f"({au['n_benign']} benign, {au['n_backdoored']} backdoored entries)")


def test_within_budget(zoo_entry, score, suite_settings):
    """The defense finishes within --budget seconds and --budget-passes passes."""
    row = _ok(score(zoo_entry))
    if suite_settings.budget_s is None and suite_settings.budget_passes is None:
        pytest.skip("no --budget or --budget-passes given")
    cost = row.get("cost") or {}
    seconds = float(cost.get("seconds") or 0.0)
    if suite_settings.budget_s is not None and seconds > suite_settings.budget_s:
        _fail(f"took {seconds:.1f}s > budget {suite_settings.budget_s:g}s")
    passes = (cost.get("forward_passes") or 0) + (cost.get("backward_passes") or 0)
    if suite_settings.budget_passes is not None and passes > suite_settings.budget_passes:
        _fail(f"made {passes} forward + backward passes > budget {suite_settings.budget_passes}")


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
            if a.get(key) != b.get(key):
                _fail(f"{part}.{key} differs between two runs with the same seed: {a.get(key)} vs {b.get(key)}")
            compared += 1
    if not compared:
        _fail("the defense returned nothing comparable (no repaired model, filter, verdict or flagged samples)")
