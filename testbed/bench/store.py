"""A bench report's per-pair results on disk: why a bench never loses work and never loses earlier rows.

Every model × defense pair is written as soon as it finishes, atomically, as three files: ``ID.safetensors``
(its arrays: filter scores, panels, flagged indices, the defense's own figures), ``ID.time.json`` (the
wall-clock fields of its ``cost``) and ``ID.json`` (the rest of the row, the data's classes, the settings that
produced it, and the arrays file's sha256; written last, so it marks the pair finished).  The report files (report.md, results.json, ...) are regenerated from all finished pairs.

    REPORT/pairs/       the pairs of every bench that wrote into REPORT (what the report shows)
    REPORT/work/        the bench in progress: plan.json (one key per pair) and the pairs it has finished
    REPORT/models/ID/   repaired or retrained models kept with --save-model (run directories)
    REPORT/.bench.lock  held while a bench writes (a second bench on the same REPORT is refused)

A bench first stages its pairs in ``work/``; at the end they replace the pairs of the same model × defense in
``pairs/`` and the report is regenerated from every pair there (earlier rows of other pairs are kept).  A bench
killed at any moment leaves ``work/plan.json``: the same command resumes and redoes only the pairs it had not
finished.  A bench with another plan first moves the interrupted bench's finished pairs into ``pairs/`` (they
are complete results; the report lists their settings) and then starts its own.  ``ID.json`` and
``ID.safetensors`` hold nothing time- or worker-dependent (the wall-clock fields are apart, in ``ID.time.json``),
so the same pair gives the same bytes whether one worker or eight ran the bench (at the same ``--threads``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from safetensors.numpy import load, save_file

from testbed.core import atomic
from testbed.core.atomic import safe_name
from testbed.evaluation.rows import DefenseRow, row_arrays, set_arrays
from testbed.core.errors import UserError
from testbed.core.guards import RunLock

PAIR_FORMAT = "segbackdoor-bench-pair"
PAIRS, WORK, MODELS, PLAN = "pairs", "work", "models", "plan.json"
WALL_CLOCK = ("seconds", "over_budget", "reported_seconds", "retrain_seconds", "pair_seconds",
              "pair_cpu_seconds", "before_cpu_seconds", "measured_on")  # cost fields kept in ID.time.json
REPORT_FILES = ("report.md", "results.json", "results.csv", "results-aggregate.csv", "scores.csv")


def pair_id(model: str, defense: str) -> str:
    """A file name for one model × defense: readable, and unique even when two names sanitise alike."""
    digest = hashlib.sha1(f"{model}\0{defense}".encode()).hexdigest()[:8]
    return f"{safe_name(model)}--{safe_name(defense)}--{digest}"


@dataclass
class Pair:
    """One finished pair: its row (with arrays), the data's classes, and the settings key it was run with."""

    row: DefenseRow
    classes: list[str]
    key: dict[str, Any]


def write_pair(directory: Path, pid: str, row: DefenseRow, classes: list[str], key: dict[str, Any]) -> None:
    """``ID.safetensors`` then ``ID.json`` (which names the arrays' sha256), each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = row_arrays(row)
    with atomic.atomic_file(directory / f"{pid}.safetensors") as tmp:
        save_file(arrays, str(tmp)) if arrays else tmp.write_bytes(b"")
    digest = hashlib.sha256((directory / f"{pid}.safetensors").read_bytes()).hexdigest()
    public = row.to_json()
    cost = dict(public["cost"])
    timing = {k: cost.pop(k) for k in WALL_CLOCK if k in cost}
    atomic.write_text(directory / f"{pid}.time.json", json.dumps(timing, sort_keys=True) + "\n")
    doc = {"format": PAIR_FORMAT, "version": 1, "key": key, "classes": list(classes), "arrays_sha256": digest,
           "row": {**public, "cost": cost}}
    atomic.write_text(directory / f"{pid}.json", json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")


def read_pair(directory: Path, pid: str) -> Pair | None:
    """A finished pair, or None when it is missing or damaged (then it is simply run again)."""
    try:
        doc = json.loads((directory / f"{pid}.json").read_text(encoding="utf-8"))
        if doc.get("format") != PAIR_FORMAT:
            return None
        data = (directory / f"{pid}.safetensors").read_bytes()
        timing = read_json(directory / f"{pid}.time.json") or {}
        row = DefenseRow.from_json({**doc["row"], "cost": {**doc["row"]["cost"], **timing}})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(data).hexdigest() == doc.get("arrays_sha256") and data:
        set_arrays(row, load(data))
    return Pair(row, list(doc.get("classes") or []), dict(doc.get("key") or {}))


def export_pairs(report: str | os.PathLike, dest: str | os.PathLike, expect: int | None = None) -> int:
    """Copy the finished pairs of a report into ``dest`` (a ``pairs/`` folder) so that a bench on another machine
    or day, given ``dest`` as its report's ``pairs/``, merges them into its report: each pair's row, timing,
    settings key (which names the sha256 of the model's weights) and the arrays the statistics need (filter
    scores, flagged indices) and the defense's own figures.  The image panels are left out (the largest arrays;
    a report regenerated from exported pairs has no panel figure for their models).  ``dest`` is replaced as a
    whole (pairs an earlier export left there go); with ``expect``, only when that many pairs were readable
    (otherwise a UserError, and ``dest`` is left as it was).  Returns the pairs copied."""
    src, dest = Path(report) / PAIRS, Path(dest)
    staged, old = dest.with_name(dest.name + ".exporting"), dest.with_name(dest.name + ".replaced")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    count = 0
    for pid in _ids(src) if src.is_dir() else []:
        pair = read_pair(src, pid)
        if pair is None:
            continue
        pair.row.panel = pair.row.benign_panel = None
        write_pair(staged, pid, pair.row, pair.classes, pair.key)
        count += 1
    if expect is not None and count != expect:
        shutil.rmtree(staged, ignore_errors=True)
        raise UserError(f"{report}: {count} readable pairs in {PAIRS}/ for {expect} rows in results.json; rerun the "
                        "bench to regenerate the report")
    shutil.rmtree(old, ignore_errors=True)  # then swap: dest holds the report's pairs and nothing older
    if dest.exists():
        os.replace(dest, old)
    os.replace(staged, dest)
    shutil.rmtree(old, ignore_errors=True)
    return count


def same_key(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a finished pair's key is the key a bench would run it with.  A pair written before keys named the
    weights' sha256 matches on the rest (its model is then identified by its paths, as it was when it ran)."""
    if "weights_sha256" not in (old.get("model") or {}) and isinstance(new.get("model"), dict):
        new = {**new, "model": {k: v for k, v in new["model"].items() if k != "weights_sha256"}}
    return old == new


def _ids(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json")
                  if p.name != PLAN and not p.name.startswith(".") and not p.name.endswith(".time.json"))


class _BenchLock(RunLock):
    NAME = ".bench.lock"


class ReportStore:
    """The per-pair files of one report directory (see the module docstring)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.pairs, self.work, self.models = self.out / PAIRS, self.out / WORK, self.out / MODELS
        self._lock: RunLock | None = None

    def check(self, overwrite: bool) -> None:
        """Refuse an ``out`` that is not a report, or an older report that cannot be merged (before any write)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a directory")
        if not out.is_dir() or not any(out.iterdir()):
            return
        ours = (out / "results.json").is_file() or self.pairs.is_dir() or (self.work / PLAN).is_file()
        if not ours:
            raise UserError(f"--out {out} exists and is not a defense report; choose a new or empty directory")
        if (out / "results.json").is_file() and not self.pairs.is_dir() and not overwrite:
            raise UserError(f"--out {out} was written by an older testbed without per-pair results ({PAIRS}/), so new "
                            "rows cannot be merged into it; pass --overwrite to replace it, or choose another --out")

    def lock(self) -> None:
        """Hold ``REPORT/.bench.lock`` until :meth:`unlock` (a second bench on this report is refused)."""
        self.out.mkdir(parents=True, exist_ok=True)
        lock = _BenchLock(self.out)
        try:
            self._lock = lock.acquire()
        except UserError:
            raise UserError(f"--out {self.out} is being written by another bench ({lock._holder()}); wait for it to "
                            "finish or choose another --out") from None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def clear(self) -> None:
        """--overwrite: forget every earlier pair, saved model and report file."""
        for d in (self.pairs, self.work, self.models, self.out / "figures"):
            shutil.rmtree(d, ignore_errors=True)
        for name in REPORT_FILES:
            (self.out / name).unlink(missing_ok=True)

    def begin(self, plan: dict[str, dict[str, Any]]) -> tuple[set[str], list[str]]:
        """Stage a bench with ``plan`` (pair id → key).  Returns the ids already finished by an interrupted run of
        the same plan (resumed), and the ids an interrupted bench with another plan had finished (now merged)."""
        old = read_json(self.work / PLAN)
        if old is not None and old.get("plan") == plan:
            done = {pid for pid in _ids(self.work) if pid in plan and (p := read_pair(self.work, pid)) is not None
                    and same_key(p.key, plan[pid])}
            return done, []
        merged = self._promote(_ids(self.work)) if self.work.is_dir() else []
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.work / PLAN, json.dumps({"plan": plan}, indent=1, sort_keys=True) + "\n")
        return set(), merged

    def _promote(self, ids: Iterable[str]) -> list[str]:
        """Move finished pairs from ``work/`` into ``pairs/`` (arrays first, the JSON marker last)."""
        self.pairs.mkdir(parents=True, exist_ok=True)
        moved = []
        for pid in ids:
            if read_pair(self.work, pid) is None:
                continue
            for suffix in (".safetensors", ".time.json", ".json"):  # the marker last
                os.replace(self.work / f"{pid}{suffix}", self.pairs / f"{pid}{suffix}")
            moved.append(pid)
        return moved

    def commit(self, plan: dict[str, dict[str, Any]]) -> None:
        """The bench finished: its pairs replace those of the same model × defense (a replaced pair's saved
        model goes too unless the new one saved its own); the plan is done."""
        for pid in self._promote([pid for pid in _ids(self.work) if pid in plan]):
            pair = read_pair(self.pairs, pid)
            if pair is not None and pair.row.saved_model is None:
                shutil.rmtree(self.models / pid, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def all_pairs(self, plan_order: Iterable[str] = ()) -> list[Pair]:
        """Every finished pair in ``pairs/``: rows of the previous results.json in their order, then the new
        ones in ``plan_order``, then any other by id."""
        ids = _ids(self.pairs) if self.pairs.is_dir() else []
        order: dict[str, int] = {}
        previous = read_json(self.out / "results.json")
        for r in (previous or {}).get("rows") or []:
            if isinstance(r, dict) and "model" in r and "defense" in r:
                order.setdefault(pair_id(str(r["model"]), str(r["defense"])), len(order))
        for pid in plan_order:
            order.setdefault(pid, len(order))
        ids.sort(key=lambda pid: (order.get(pid, len(order)), pid))
        return [p for p in (read_pair(self.pairs, pid) for pid in ids) if p is not None]

    def saved_model_dir(self, pid: str) -> Path:
        self.models.mkdir(parents=True, exist_ok=True)
        return self.models / pid


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
