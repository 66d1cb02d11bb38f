"""Benchmarking defenses: every defense on every model, one report (the library behind `testbed bench`/`defend`).

Each model × defense pair goes through :func:`testbed.defense_runner.run_defense`, so a built-in and an
outside defense are scored identically; a defense that fails on one model is recorded and the others still
run.  Rows of a zoo bench also carry the entry's ``seed``, its ``group`` (grid point without the seed) and
the poisoned file's ``attack_params``, which statistics over seeds group by.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from testbed.defense_row import DefenseRow, ZooKeys
from testbed.errors import UserError


@dataclass
class BenchModel:
    """One model to defend: its run, the data it was poisoned with, what attack (for the report).

    ``seed`` and ``group`` are set for zoo entries (the statistics group rows by them)."""

    id: str
    run_dir: Path
    data_path: Path
    attack: str | None = None
    is_benign: bool | None = None
    seed: int | None = None
    group: dict[str, Any] | None = None


def split_names(spec: str | Sequence[Any]) -> list[Any]:
    """``"a,b"`` or a list of names/defense objects → the list, refusing an empty one and repeated names."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if not (isinstance(s, str) and not s)]
    if not items:
        raise UserError("--defense is empty; name at least one defense, e.g. --defense fine-pruning")
    names = [s for s in items if isinstance(s, str)]
    dup = sorted({s for s in names if names.count(s) > 1})
    if dup:
        raise UserError(f"--defense lists {', '.join(dup)} twice; name each defense once")
    return items


def zoo_models(zoo_path: str | os.PathLike, entries: str | None = None) -> list[BenchModel]:
    """The finished entries of a zoo (those whose id matches the glob ``entries``) as models to defend."""
    import testbed.zoo

    zoo = testbed.zoo.open(zoo_path)
    out = [BenchModel(e.id, Path(e.run_dir), Path(e.data_path), e.attack_id, bool(e.is_benign), int(e.seed), e.group)
           for e in zoo if entries is None or fnmatch.fnmatchcase(e.id, entries)]
    if not out:
        what = f" matching {entries!r}" if entries else ""
        raise UserError(f"zoo {zoo_path} has no finished entries{what}; build it with `testbed zoo build` or change --entries")
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise UserError(f"--out {out} exists and is not a defense report; choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)


def _progress_callback(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    from testbed import progress

    bar = progress.bar(total=1000, desc=desc)

    def update(fraction: float, message: str) -> None:
        try:
            target = int(1000 * min(1.0, max(0.0, float(fraction))))
        except (TypeError, ValueError):
            return
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(str(message)[:60], refresh=False)

    return update, bar.close


def _check_args(defenses: str | Sequence[Any], params: dict[str, dict[str, Any]], budget_s: float | None,
                batch_size: int) -> tuple[list[Any], list[str]]:
    """The defense specs and their names, every one loaded once so a bad name or parameter fails up front."""
    from testbed.defenses.registry import load_defense

    if budget_s is not None and not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise UserError(f"--budget must be a positive number of seconds, got {budget_s!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    specs = split_names(defenses)
    unknown = sorted(set(params) - {s for s in specs if isinstance(s, str)})
    if unknown:
        raise UserError(f"parameters given for {', '.join(unknown)}, which is not among the defenses; check --param names")
    names = [load_defense(s, **params.get(s, {})).name if isinstance(s, str) else load_defense(s).name for s in specs]
    return specs, names


def _models(models: Sequence[BenchModel] | None, zoo: Any, run: Any, data: Any, entries: str | None) -> list[BenchModel]:
    if models is not None:
        return list(models)
    if zoo is not None:
        return zoo_models(zoo, entries)
    if run is not None:
        if data is None:
            raise UserError("--run needs --data POISONED.h5 (the dataset the model was trained on)")
        return [BenchModel(Path(run).name or "model", Path(run), Path(data))]
    raise UserError("name the models to defend: --zoo ZOO/ or --run RUN/ --data D.h5")


def _defend_model(m: BenchModel, specs: list[Any], names: list[str], params: dict[str, dict[str, Any]], dev: Any,
                  opts: dict[str, Any], progress: bool, say: Callable[[str], None]) -> tuple[list[DefenseRow], list[str]]:
    """Every defense on one model (its before-scores computed once); returns the rows and the data's classes."""
    from testbed.defense_runner import run_defense
    from testbed.defenses.registry import load_defense
    from testbed.h5data import open_dataset
    from testbed.runs import load_run
    from testbed.scoring import score_model

    with open_dataset(m.data_path, check_labels=False) as f:
        classes, poisoned, attack = list(f.classes), f.is_poisoned, f.attack
    original, _ = load_run(m.run_dir, dev)
    before = score_model(original, m.data_path, device=dev, batch_size=opts["batch_size"])
    del original
    zoo = None if m.group is None else ZooKeys(seed=m.seed, group=dict(m.group),
                                               attack_params=attack.get("params") if attack else None)
    rows = []
    for spec, name in zip(specs, names):
        defense = load_defense(spec, **params.get(spec, {})) if isinstance(spec, str) else spec
        cb, close = _progress_callback(f"{m.id} × {name}") if progress else (None, lambda: None)
        try:
            row = run_defense(defense, m.run_dir, m.data_path, device=dev, progress=cb, before=before, model_id=m.id,
                              attack=m.attack, train_progress=progress, **opts)
        finally:
            close()
        row.benign_model = (not poisoned) if m.is_benign is None else bool(m.is_benign)
        row.zoo = zoo
        rows.append(row)
        say(summary_line(row))
    return rows, classes


def run_bench(
    out: str | os.PathLike,
    defenses: str | Sequence[Any],
    *,
    zoo: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    models: Sequence[BenchModel] | None = None,
    entries: str | None = None,
    device: str = "auto",
    seed: int = 0,
    budget_s: float | None = None,
    budget_passes: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 32,
    figures: bool = True,
    title: str = "Defense benchmark",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every defense on every model and write the report into ``out``; returns the results.json content
    plus ``"errors"`` (failed runs), ``"defense_errors"`` (runs the defense failed) and ``"testbed_errors"``
    (runs and figures the testbed itself failed).

    Models come from ``zoo`` (a zoo directory), ``run`` + ``data``, or ``models`` (a list of
    :class:`BenchModel`).  ``defenses``: comma-separated names or a list of names/defense objects.
    """
    from testbed import atomic, report
    from testbed.device import resolve_device

    params = dict(params or {})
    specs, names = _check_args(defenses, params, budget_s, batch_size)
    models = _models(models, zoo, run, data, entries)
    out = Path(out)
    _check_out(out)
    dev = resolve_device(device)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    opts = {"seed": seed, "budget_s": budget_s, "budget_passes": budget_passes, "batch_size": batch_size}
    rows: list[DefenseRow] = []
    classes: dict[str, list[str]] = {}
    for m in models:
        mine, classes[m.id] = _defend_model(m, specs, names, params, dev, opts, progress, say)
        rows += mine
    meta = {
        "title": title, "zoo": str(zoo) if zoo is not None else None, "data": str(data) if data is not None else None,
        "device": str(dev), "seed": seed, "budget_s": budget_s, "defenses": names,
        "models": [m.id for m in models], "params": params or None,
    }
    with atomic.atomic_dir(out) as tmp:
        doc = report.write_report(tmp, rows, meta=meta, classes=classes, figures=figures)
    doc["errors"] = sum(1 for r in rows if r.error)
    doc["defense_errors"] = sum(1 for r in rows if r.error and r.error_source == "defense")
    doc["testbed_errors"] = sum(1 for r in rows if r.error and r.error_source == "testbed") + len(doc.get("figure_errors", []))
    return doc


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def summary_line(row: DefenseRow) -> str:
    """One line per finished run, for the log."""
    if row.error:
        what = "TESTBED ERROR" if row.error_source == "testbed" else "FAILED"
        return f"{row.model} × {row.defense}: {what} ({row.error})"
    b, a = row.before or {}, row.after or {}
    parts = [f"{row.model} × {row.defense}:"]
    if row.after:
        parts.append(f"ASR {_f(b.get('ASR'))} → {_f(a.get('ASR'))}, mIoU-B {_f(b.get('mIoU-B'))} → {_f(a.get('mIoU-B'))}, "
                     f"DER {_f(row.der, 3)}")
    if row.detection:
        d = row.detection
        parts.append(f"TPR {_f(d.tpr, 3)} FPR {_f(d.fpr, 3)} AUROC {_f(d.auroc, 3)}")
    if row.flagged:
        fl = row.flagged
        parts.append(f"flagged {fl.count} (precision {_f(fl.precision, 3)}, recall {_f(fl.recall, 3)})")
    if row.verdict:
        v = row.verdict
        parts.append(f"verdict {'backdoored' if v.backdoored else 'clean'} (score {_f(v.score)})")
    parts.append(f"{_f(row.cost.seconds, 1)} s" + (" (over budget)" if row.cost.over_budget else ""))
    return " ".join(parts)
