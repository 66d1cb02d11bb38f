"""One row of a defense report (one model × one defense), typed, and its JSON form in ``results.json``.

The runner fills a :class:`DefenseRow` part by part; :meth:`DefenseRow.to_json` gives the report's row
object (key order included), and the arrays behind figures and ``scores.csv`` stay typed fields that
never reach JSON.  A row also reads like that JSON object (``row["after"]["ASR"]``), so code written
against the report's rows works on a fresh row too.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

from testbed.core.jsonutil import jsonable

ErrorSource = Literal["defense", "testbed"]
TRACEBACK_FRAMES = 12  # innermost frames kept in details["traceback"]: where the error happened, not the runner's


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
    # why TPR/FPR/AUROC compare different images rather than the same images with and without a trigger
    # (an attack that picks test images by content, e.g. a semantic trigger); None when they do not
    confounded: str | None = None

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
    fraction: float | None = None  # share of the training images removed (count / training-set size)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerdictRecord:
    """A detection defense's verdict as reported (score NaN → null, ±inf clipped so rankings keep it extreme)."""

    backdoored: bool
    score: float | None
    suspected: list[list[str]]
    status: str = "clean"  # backdoored | clean | inconclusive (a search that did not cover its candidates)
    coverage: float | None = None  # share of the candidates the search covered, as the defense reported it

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
    budget_passes: int | None = None
    stopped_by: str | None = None  # the budget that stopped the run: "passes" | "seconds" | None (details["stopped_by"])
    pair_seconds: float | None = None  # the whole model × defense pair in its worker: load, score, defend, retrain, score
    pair_cpu_seconds: float | None = None  # that worker process's CPU time over the pair (all its threads)
    before_cpu_seconds: float | None = None  # of which the model's scores before any defense (0: cached in the process)
    measured_on: str | None = None  # the CPU (as the kernel names it) these seconds were measured on

    def report(self, cost: Any) -> None:
        """Take the defense's :class:`~testbed.defense.Cost` (any object with those attributes)."""
        got = jsonable({"forward_passes": getattr(cost, "forward_passes", None),
                        "backward_passes": getattr(cost, "backward_passes", None),
                        "reported_seconds": getattr(cost, "seconds", None)})
        self.forward_passes, self.backward_passes = got["forward_passes"], got["backward_passes"]
        self.reported, self.reported_seconds = True, got["reported_seconds"]

    def to_json(self) -> dict[str, Any]:
        out = {"seconds": self.seconds, "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
               "budget_s": self.budget_s, "budget_passes": self.budget_passes, "over_budget": self.over_budget,
               "stopped_by": self.stopped_by}
        if self.reported:
            out["reported_seconds"] = self.reported_seconds
        if self.retrain_seconds is not None:
            out["retrain_seconds"] = self.retrain_seconds
        if self.pair_seconds is not None:
            out.update(pair_seconds=self.pair_seconds, pair_cpu_seconds=self.pair_cpu_seconds,
                       before_cpu_seconds=self.before_cpu_seconds, measured_on=self.measured_on)
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
    """A few test images (attacked, or benign) with their labels and the predictions before (and after) the defense."""

    index: np.ndarray
    images: np.ndarray  # uint8 [n,H,W,3]
    gt: np.ndarray  # benign label [n,H,W]
    target: np.ndarray | None  # the attacker's target label [n,H,W] (None: benign test images)
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
    after_random: dict[str, Any] | None = None  # retrain control: a random subset of the same size removed
    der_random: float | None = None
    detection: Detection | None = None
    flagged: Flagged | None = None
    verdict: VerdictRecord | None = None
    cost: RunCost = field(default_factory=RunCost)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_source: ErrorSource | None = None
    benign_model: bool | None = None  # set by a bench: is the model known to be clean?
    attack_implanted: bool | None = None  # set by a bench: False = ASR before below the threshold (DER is n/a)
    # set by a zoo bench: {"entry": ID, "ASR": A}, what the zoo's benign model of the same architecture and seed
    # scores on this model's attacked test set; an ASR before that does not exceed it is no backdoor (DER is n/a)
    benign_floor: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the numbers right
    saved_model: str | None = None  # run directory of the repaired/retrained model (--save-model)
    defense_figures: list[str] = field(default_factory=list)  # report-relative paths of the defense's own figures
    settings: dict[str, Any] | None = None  # set by a bench: seed, budgets, parameters this row was run with
    attack_params: dict[str, Any] | None = None  # set by a bench: the model's attack parameters (None: benign)
    zoo: ZooKeys | None = None  # set by a zoo bench
    # never in JSON: arrays for figures and scores.csv, and the bytes of the defense's own figures
    filter_scores: FilterScores | None = None
    panel: Panel | None = None
    benign_panel: Panel | None = None
    flagged_index: np.ndarray | None = None
    figure_bytes: dict[str, bytes] = field(default_factory=dict)  # file name -> image bytes

    def fail(self, exc: BaseException, source: ErrorSource) -> None:
        """Record ``exc`` (with the innermost frames of its traceback in ``details``) as this row's error."""
        self.error = f"{type(exc).__name__}: {exc}"
        self.error_source = source
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES))
        self.details = {**(self.details or {}), "traceback": tb}

    def last_frames(self, n: int = 3) -> list[str]:
        """The innermost ``n`` frames of a failed row's traceback ("file:line in function: code"), for the report."""
        return last_frames(str((self.details or {}).get("traceback") or ""), n)

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
        if self.after_random is not None:
            out.update(after_random=self.after_random, DER_random=self.der_random)
        if self.benign_model is not None:
            out["benign_model"] = self.benign_model
        if self.attack_implanted is not None:
            out["attack_implanted"] = self.attack_implanted
        if self.benign_floor is not None:
            out["benign_floor"] = dict(self.benign_floor)
        out["notes"] = list(self.notes)  # always present (docs/writing-a-defense.md lists it), empty when nothing to note
        if self.saved_model is not None:
            out["saved_model"] = self.saved_model
        if self.defense_figures:
            out["defense_figures"] = list(self.defense_figures)
        if self.settings is not None:
            out["settings"] = self.settings
        if self.zoo is not None:
            out.update(seed=self.zoo.seed, group=self.zoo.group, attack_params=self.zoo.attack_params)
        elif self.attack_params is not None:
            out["attack_params"] = self.attack_params
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DefenseRow":
        """The row back from its JSON form (arrays and figure bytes stay empty: :func:`set_arrays` adds them)."""
        def typed(kind: type, value: Any) -> Any:
            if value is None:
                return None
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in value.items() if k in names})

        cost = dict(d.get("cost") or {})
        run_cost = RunCost(budget_s=cost.get("budget_s"), seconds=cost.get("seconds"), over_budget=cost.get("over_budget"),
                           forward_passes=cost.get("forward_passes"), backward_passes=cost.get("backward_passes"),
                           reported="reported_seconds" in cost, reported_seconds=cost.get("reported_seconds"),
                           retrain_seconds=cost.get("retrain_seconds"), budget_passes=cost.get("budget_passes"),
                           stopped_by=cost.get("stopped_by"), pair_seconds=cost.get("pair_seconds"),
                           pair_cpu_seconds=cost.get("pair_cpu_seconds"), before_cpu_seconds=cost.get("before_cpu_seconds"),
                           measured_on=cost.get("measured_on"))
        zoo = ZooKeys(int(d["seed"]), dict(d.get("group") or {}), d.get("attack_params")) if "group" in d else None
        verdict = d.get("verdict")
        if verdict is not None and "status" not in verdict:  # a report written before verdicts had a status
            verdict = {**verdict, "status": "backdoored" if verdict.get("backdoored") else "clean"}
        return cls(
            model=d["model"], attack=d["attack"], defense=d["defense"], run=d["run"], data=d["data"],
            kinds=list(d.get("kinds") or []), before=d.get("before"), after=d.get("after"), der=d.get("DER"),
            after_random=d.get("after_random"), der_random=d.get("DER_random"),
            detection=typed(Detection, d.get("detection")), flagged=typed(Flagged, d.get("flagged")),
            verdict=typed(VerdictRecord, verdict), cost=run_cost, details=dict(d.get("details") or {}),
            error=d.get("error"), error_source=d.get("error_source"), benign_model=d.get("benign_model"),
            attack_implanted=d.get("attack_implanted"), benign_floor=d.get("benign_floor"), notes=list(d.get("notes") or []),
            saved_model=d.get("saved_model"), defense_figures=list(d.get("defense_figures") or []),
            settings=d.get("settings"), attack_params=None if zoo is not None else d.get("attack_params"), zoo=zoo,
        )

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


def last_frames(tb: str, n: int = 3) -> list[str]:
    """The innermost ``n`` frames of a formatted traceback as one line each: ``file:line in function: code``."""
    frames = []
    lines = tb.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "(.*)", line (\d+), in (.*)', line)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File ") else ""
            frames.append(f"{m.group(1)}:{m.group(2)} in {m.group(3)}" + (f": {code}" if code else ""))
    return frames[-n:]


# -- arrays of a row, for a bench's per-pair files ---------------------------------------------------
_PANEL_FIELDS = ("index", "images", "gt", "target", "before", "after", "rejected")


def row_arrays(row: DefenseRow) -> dict[str, np.ndarray]:
    """Everything of ``row`` that JSON does not hold, as named arrays (figure bytes as uint8)."""
    out: dict[str, np.ndarray] = {}
    s = row.filter_scores
    if s is not None:
        out.update({"scores.benign_index": np.asarray(s.benign_index, np.int64), "scores.benign": np.asarray(s.benign, np.float64),
                    "scores.attacked": np.asarray(s.attacked, np.float64),
                    "scores.threshold": np.asarray([s.threshold], np.float64)})
    for prefix, panel in (("panel", row.panel), ("benign_panel", row.benign_panel)):
        for name in _PANEL_FIELDS if panel is not None else ():
            value = getattr(panel, name)
            if value is not None:
                out[f"{prefix}.{name}"] = np.ascontiguousarray(value)
    if row.flagged_index is not None:
        out["flagged_index"] = np.asarray(row.flagged_index, np.int64)
    for name, data in row.figure_bytes.items():
        out[f"figure.{name}"] = np.frombuffer(data, np.uint8)
    return out


def set_arrays(row: DefenseRow, arrays: Mapping[str, np.ndarray]) -> None:
    """The inverse of :func:`row_arrays`."""
    if "scores.benign" in arrays:
        row.filter_scores = FilterScores(benign_index=arrays["scores.benign_index"], benign=arrays["scores.benign"],
                                         attacked=arrays["scores.attacked"], threshold=float(arrays["scores.threshold"][0]))
    if "panel.images" in arrays:
        row.panel = Panel(**{name: arrays.get(f"panel.{name}") for name in _PANEL_FIELDS})
    if "benign_panel.images" in arrays:
        row.benign_panel = Panel(**{name: arrays.get(f"benign_panel.{name}") for name in _PANEL_FIELDS})
    if "flagged_index" in arrays:
        row.flagged_index = arrays["flagged_index"]
    row.figure_bytes = {k[len("figure."):]: bytes(np.asarray(v, np.uint8)) for k, v in arrays.items() if k.startswith("figure.")}


def public_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of a row: :meth:`DefenseRow.to_json`, or a plain dict without its ``_`` keys."""
    if isinstance(row, DefenseRow):
        return row.to_json()
    return {k: v for k, v in row.items() if not str(k).startswith("_")}
