"""Verdict defenses scored across a zoo: accuracy, TPR, FPR and AUROC over benign vs backdoored models.

Each rate carries a Wilson interval and AUROC a seeded stratified bootstrap (see ``intervals``).  An
*inconclusive* verdict (a search that did not cover its candidates) is neither clean nor backdoored: it is
counted on its own and left out of the rates, whose denominators are the decided verdicts.  A backdoored
verdict on a backdoored model is split by whether it named the attack's target class.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from testbed.stats.intervals import LEVEL, auroc, auroc_interval, wilson_interval
from testbed.stats.rows import defenses_in, identify

TARGET_CLASSES = ("right_target", "wrong_target", "target_not_named", "no_single_target")


def true_targets(attack_params: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The class(es) an attack relabels to, from the poisoned file's ``attack.params``; None = no single class.

    FGBA: the values of the resolved ``mapping`` (or ``target``): one class for N-to-1 and 1-to-1, several
    for a map.  BadNets relabels every pixel to one *image's* label map, so there is no target class to name
    (its ``target_class`` only chose that image): None, and its detections are counted as
    ``no_single_target`` rather than right or wrong.
    """
    if not isinstance(attack_params, Mapping):
        return None
    mapping = attack_params.get("mapping")
    if isinstance(mapping, Mapping) and mapping:
        return frozenset(str(v) for v in mapping.values())
    target = attack_params.get("target")
    if isinstance(target, str) and target:
        return frozenset([target])
    return None


def verdict_status(verdict: Mapping[str, Any]) -> str:
    """``backdoored`` | ``clean`` | ``inconclusive`` (older reports have only the boolean)."""
    status = verdict.get("status")
    if status in ("backdoored", "clean", "inconclusive"):
        return str(status)
    return "backdoored" if verdict.get("backdoored") else "clean"


def suspected_targets(verdict: Mapping[str, Any]) -> set[str]:
    """Target classes named by the verdict's suspected ``[source, target]`` pairs (a bare string = a target)."""
    out = set()
    for item in verdict.get("suspected") or []:
        if isinstance(item, str):
            out.add(item)
        elif isinstance(item, (list, tuple)) and len(item) >= 2:
            out.add(str(item[1]))
    return out


def target_class(verdict: Mapping[str, Any], truth: frozenset[str] | None) -> str:
    """Which of TARGET_CLASSES a correct detection falls in."""
    if truth is None:
        return "no_single_target"
    named = suspected_targets(verdict)
    if not named:
        return "target_not_named"
    return "right_target" if named & truth else "wrong_target"


def _rate(k: int, n: int, level: float) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n, level)
    return {"value": k / n if n else None, "lo": lo, "hi": hi, "k": k, "n": n}


def _one(rows: Sequence[dict[str, Any]], targets: Mapping[str, Iterable[str] | None] | None, level: float,
         seed: int) -> dict[str, Any]:
    decided: list[tuple[int, bool, Any]] = []  # (truth, said backdoored, score)
    inconclusive = {"benign": 0, "backdoored": 0}
    kinds = dict.fromkeys(TARGET_CLASSES, 0)
    unknown_truth = 0
    for r in rows:
        if r.get("benign_model") is None:
            unknown_truth += 1
            continue
        truth = 0 if r["benign_model"] else 1
        status = verdict_status(r["verdict"])
        if status == "inconclusive":
            inconclusive["backdoored" if truth else "benign"] += 1
            continue
        said = status == "backdoored"
        decided.append((truth, said, r["verdict"].get("score")))
        if truth and said:
            known = targets is not None and str(r.get("model")) in targets
            t = targets[str(r["model"])] if known else true_targets(r.get("attack_params"))
            kinds[target_class(r["verdict"], None if t is None else frozenset(t))] += 1
    tp = sum(1 for t, s, _ in decided if t and s)
    fp = sum(1 for t, s, _ in decided if not t and s)
    pos = sum(1 for t, _, _ in decided if t)
    neg = len(decided) - pos
    scored = [(t, float(sc)) for t, _, sc in decided if sc is not None]
    labels, scores = [t for t, _ in scored], [s for _, s in scored]
    lo, hi = auroc_interval(labels, scores, level, seed=seed)
    return {
        "decided": len(decided), "inconclusive": inconclusive, "unknown_truth": unknown_truth,
        "accuracy": _rate(tp + (neg - fp), len(decided), level),
        "tpr": _rate(tp, pos, level), "fpr": _rate(fp, neg, level),
        "auroc": {"value": auroc(labels, scores), "lo": lo, "hi": hi,
                  "n_benign": labels.count(0), "n_backdoored": labels.count(1)},
        "detected": kinds,
    }


def detection_summary(rows: Sequence[dict[str, Any]], targets: Mapping[str, Iterable[str] | None] | None = None, *,
                      level: float = LEVEL, seed: int = 0) -> list[dict[str, Any]]:
    """Per verdict defense: counts, rates with intervals, AUROC with interval, and the target breakdown.

    ``targets`` maps a model id to its true target class(es) (None = no single target); a model not in it
    takes :func:`true_targets` of its row's ``attack_params``.  Failed runs count in ``errors`` only.
    """
    out = []
    rows = identify(rows)  # a defense is its name and parameters
    for name in defenses_in(rows):
        mine = [r for r in rows if str(r.get("defense")) == name]
        verdicts = [r for r in mine if not r.get("error") and isinstance(r.get("verdict"), Mapping)]
        if not verdicts:
            continue
        out.append({"defense": name, "models": len(verdicts),
                    "benign": sum(1 for r in verdicts if r.get("benign_model") is True),
                    "backdoored": sum(1 for r in verdicts if r.get("benign_model") is False),
                    "errors": sum(1 for r in mine if r.get("error")), **_one(verdicts, targets, level, seed)})
    return out
