"""One row of a defense report (one model × one defense), typed, and its JSON form in ``results.json``.

The runner fills a :class:`DefenseRow` part by part; :meth:`DefenseRow.to_json` gives the report's row
object (key order included), and the arrays behind figures and ``scores.csv`` stay typed fields that
never reach JSON.  A row also reads like that JSON object (``row["after"]["ASR"]``), so code written
against the report's rows works on a fresh row too.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

from testbed.jsonutil import jsonable

ErrorSource = Literal["defense", "testbed"]


@dataclass
class Detection:
    """An input filter scored on the test sets: attacked inputs flagged (TPR), benign flagged (FPR), AUROC."""

    tpr: float | None
    fpr: float | None
    auroc: float | None
    threshold: float
    benign_flagged: int
    benign_total: int
    attacked_flagged: int
    attacked_total: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Flagged:
    """Training samples a defense flagged, against the true poison indices."""

    count: int
    true_poison: int
    true_positives: int
    precision: float | None
    recall: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerdictRecord:
    """A detection defense's verdict as reported (score NaN → null, ±inf clipped so rankings keep it extreme)."""

    backdoored: bool
    score: float | None
    suspected: list[list[str]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunCost:
    """Wall seconds measured by the runner, beside what the defense reported about itself."""

    budget_s: float | None = None
    seconds: float | None = None
    over_budget: bool | None = None
    forward_passes: Any = None
    backward_passes: Any = None
    reported: bool = False  # the defense returned a result, so its own cost report exists (maybe empty)
    reported_seconds: Any = None
    retrain_seconds: float | None = None

    def report(self, cost: Any) -> None:
        """Take the defense's :class:`~testbed.defense.Cost` (any object with those attributes)."""
        got = jsonable({"forward_passes": getattr(cost, "forward_passes", None),
                        "backward_passes": getattr(cost, "backward_passes", None),
                        "reported_seconds": getattr(cost, "seconds", None)})
        self.forward_passes, self.backward_passes = got["forward_passes"], got["backward_passes"]
        self.reported, self.reported_seconds = True, got["reported_seconds"]

    def to_json(self) -> dict[str, Any]:
        out = {"seconds": self.seconds, "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
               "budget_s": self.budget_s, "over_budget": self.over_budget}
        if self.reported:
            out["reported_seconds"] = self.reported_seconds
        if self.retrain_seconds is not None:
            out["retrain_seconds"] = self.retrain_seconds
        return out


@dataclass
class FilterScores:
    """Every test input's filter score (for ``scores.csv`` and the histogram): benign ones by their index
    into ``/test``, attacked ones by their index into ``/test_attacked``."""

    benign_index: np.ndarray
    benign: np.ndarray
    attacked: np.ndarray
    threshold: float

    def splits(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(split, index, scores)`` for ``test_benign`` then ``test_attacked``."""
        yield "test_benign", self.benign_index, self.benign
        yield "test_attacked", np.arange(self.attacked.size), self.attacked


@dataclass
class Panel:
    """A few attacked test images with their labels and the predictions before (and after) the defense."""

    index: np.ndarray
    images: np.ndarray  # uint8 [n,H,W,3]
    gt: np.ndarray  # benign label [n,H,W]
    target: np.ndarray  # the attacker's target label [n,H,W]
    before: np.ndarray | None = None
    after: np.ndarray | None = None
    rejected: np.ndarray | None = None  # bool [n]: inputs the filter rejected (no prediction)


@dataclass
class ZooKeys:
    """What a zoo bench adds to a row so statistics can group it: the entry's seed, its grid point without the
    seed, and the poisoned file's attack parameters (None for a benign entry)."""

    seed: int
    group: dict[str, Any]
    attack_params: dict[str, Any] | None


@dataclass(eq=False)
class DefenseRow(Mapping):
    """One model × defense: scores before/after, each result kind's part, cost, details, and any error.

    ``error_source`` says whose failure an ``error`` is: ``"defense"`` (its ``run``, or something it returned,
    raised or broke the protocol) or ``"testbed"`` (the testbed's own retraining, scoring, or loading).
    """

    model: str
    attack: str
    defense: str
    run: str
    data: str
    kinds: list[str] = field(default_factory=list)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    der: float | None = None
    detection: Detection | None = None
    flagged: Flagged | None = None
    verdict: VerdictRecord | None = None
    cost: RunCost = field(default_factory=RunCost)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_source: ErrorSource | None = None
    benign_model: bool | None = None  # set by a bench: is the model known to be clean?
    zoo: ZooKeys | None = None  # set by a zoo bench
    # never in JSON: arrays for figures and scores.csv
    filter_scores: FilterScores | None = None
    panel: Panel | None = None
    flagged_index: np.ndarray | None = None

    def fail(self, exc: BaseException, source: ErrorSource) -> None:
        """Record ``exc`` (with its traceback in ``details``) as this row's error, blamed on ``source``."""
        self.error = f"{type(exc).__name__}: {exc}"
        self.error_source = source
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
        self.details = {**(self.details or {}), "traceback": tb}

    def to_json(self) -> dict[str, Any]:
        """The row object of ``results.json`` (parts as plain JSON; ``details`` is shared, not copied)."""
        def part(p: Any) -> Any:
            return None if p is None else p.to_json()

        out: dict[str, Any] = {
            "model": self.model, "attack": self.attack, "defense": self.defense, "run": self.run, "data": self.data,
            "kinds": list(self.kinds), "before": self.before, "after": self.after, "DER": self.der,
            "detection": part(self.detection), "flagged": part(self.flagged), "verdict": part(self.verdict),
            "cost": self.cost.to_json(), "details": self.details, "error": self.error, "error_source": self.error_source,
        }
        if self.benign_model is not None:
            out["benign_model"] = self.benign_model
        if self.zoo is not None:
            out.update(seed=self.zoo.seed, group=self.zoo.group, attack_params=self.zoo.attack_params)
        return out

    # -- read like the JSON row ---------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        legacy = _LEGACY.get(key)
        if legacy is not None:
            value = legacy(self)
            if value is None:
                raise KeyError(key)
            return value
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def _legacy_scores(row: DefenseRow) -> dict[str, Any] | None:
    s = row.filter_scores
    if s is None:
        return None
    return {**{split: (index, values) for split, index, values in s.splits()}, "threshold": s.threshold}


def _legacy_panel(row: DefenseRow) -> dict[str, Any] | None:
    p = row.panel
    if p is None:
        return None
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if getattr(p, f.name) is not None}


# Read-only views under the row's former hidden keys, for code written before the arrays were typed fields.
_LEGACY = {"_scores": _legacy_scores, "_panel": _legacy_panel, "_flagged_index": lambda row: row.flagged_index}


def public_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of a row: :meth:`DefenseRow.to_json`, or a plain dict without its ``_`` keys."""
    if isinstance(row, DefenseRow):
        return row.to_json()
    return {k: v for k, v in row.items() if not str(k).startswith("_")}
