"""Running one defense on one trained model, under the threat model (docs/writing-a-defense.md), and scoring what it returns.

The runner is the only place that sees both sides.  It hands the defense a context built by
:mod:`testbed.evaluation.threat_model` (a fresh copy of the model, the trusted clean subset and, for defenses that
declare ``uses_training_set = True``, a read-only view of the training set), then scores the result with
the attacker's secrets through :mod:`testbed.evaluation.scoring`, one function per result kind, the same way
for every defense.  Variants the defense describes in its ``details`` (a pruning curve) are scored by
:mod:`testbed.evaluation.variants`.  The outcome is one :class:`~testbed.evaluation.rows.DefenseRow`.

Failures: an exception from the defense's ``run`` (or its ``input_scores``, or its repaired model), or a
result that breaks the protocol, gives a row with ``error`` and ``error_source = "defense"``; a failure
of the testbed's own loading, retraining or scoring gives ``error_source = "testbed"``.

Defense loading lives in :mod:`testbed.defenses.registry`, the context in :mod:`testbed.evaluation.threat_model`.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from testbed import models
from testbed.core import atomic
from testbed.core.jsonutil import jsonable
from testbed.defense import DefenseResult
from testbed.evaluation.rows import DefenseRow, RunCost
from testbed.evaluation.scoring import (
    DefenseFault, benign_panel_before, blame_defense, panel_before, protocol_error, random_removal,
    retrain_without, score_after, score_filter, score_repair, score_retrain, score_verdict, scores_only,
    take_figures,
)
from testbed.evaluation.loaded import DataFacts, LoadedRun, load_pair
from testbed.evaluation.threat_model import Progress, make_context
from testbed.evaluation.variants import score_variants
from testbed.training.provenance import model_attack_label
from testbed.training.runs import load_config, save_model

PANEL_IMAGES = 3  # attacked (and as many benign) test images kept for Figure-1-style panels

__all__ = ["PANEL_IMAGES", "DataFacts", "DefenseSettings", "LoadedRun", "load_pair", "run_defense"]


@dataclass
class DefenseSettings:
    """How one defense run goes (the model and data come in a :class:`LoadedRun`).

    ``before``-scores come from the :class:`LoadedRun` (computed once per batch size).  ``random_control``: for a
    training-set defense, also retrain without a random subset of the same size (``after_random``).
    ``save_model``: a directory to keep the repaired or retrained model in, as a run (``params`` are recorded in
    its config).  ``attack`` labels the row; by default the attack the model was trained with.
    """

    seed: int = 0
    budget_s: float | None = None
    budget_passes: int | None = None
    progress: Progress | None = None
    batch_size: int = 32
    model_id: str | None = None
    attack: str | None = None
    work_dir: str | os.PathLike | None = None
    panels: int = PANEL_IMAGES
    train_progress: bool = False
    random_control: bool = True
    save_model: str | os.PathLike | None = None
    params: dict[str, Any] | None = None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_behind_boundary(defense: Any, row: DefenseRow, run: LoadedRun, settings: DefenseSettings) -> DefenseResult:
    """The defense on its own copy of the model, seeing only its context; its cost and details go in ``row``."""
    model = run.fresh_model()
    ctx = make_context(defense, run.data, device=run.device, seed=settings.seed, budget_s=settings.budget_s,
                       budget_passes=settings.budget_passes, progress=settings.progress)
    _seed_everything(settings.seed)
    t0 = time.perf_counter()
    try:
        result = blame_defense(defense.run, model, ctx)
    finally:
        seconds = time.perf_counter() - t0
        row.cost.seconds = round(seconds, 4)
        row.cost.over_budget = None if settings.budget_s is None else bool(seconds > settings.budget_s)
    if not isinstance(result, DefenseResult):
        raise protocol_error(f"{row.defense}.run returned {type(result).__name__}, expected testbed.defense.DefenseResult",
                             TypeError)
    row.kinds = result.kinds()
    row.cost.report(result.cost)
    raw = result.details if result.details is not None else {}
    if not isinstance(raw, dict):
        raise protocol_error(f"{row.defense} returned details of type {type(raw).__name__}, expected a dict", TypeError)
    raw = dict(raw)
    figures = take_figures(raw)
    row.details = jsonable(raw)
    row.figure_bytes = figures
    note = row.details.get("note")  # what the defense says a reader must know (e.g. too few clean images)
    if isinstance(note, str) and note:
        row.notes.append(f"{row.defense}: {note}")
    stopped = row.details.get("stopped_by")
    row.cost.stopped_by = stopped if stopped in ("passes", "seconds") else None
    score_variants(row.details, run.model, run.data, run.device, settings.batch_size)
    return result


def _random_control(row: DefenseRow, before: dict[str, Any], run: LoadedRun, settings: DefenseSettings,
                    tmp: Path) -> None:
    """Retrain without a random subset of the same size as the flagged one: ``after_random`` beside ``after``."""
    count = int(row.flagged.count)
    if count == 0:  # nothing removed: the control is the same training set, so the same model
        row.after_random, row.der_random = row.after, row.der
        return
    removed = random_removal(run.facts.n_train, count, settings.seed)
    model, _ = retrain_without(run.config, run.data_path, removed, run.facts.n_train, run.device, tmp,
                               settings.train_progress, name="retrained-random")
    part = score_after(model, None, before, run.data, run.device, settings.batch_size)
    row.after_random, row.der_random = part.after, part.der


def _save(row: DefenseRow, model: nn.Module, config: dict[str, Any], run: LoadedRun, settings: DefenseSettings) -> None:
    """Keep the model scored "after" as a run directory (safetensors + config.json) at ``settings.save_model``.

    Only a model of the run's own architecture can be a run (a wrapper around it, like an input filter built
    into the forward, has other weights); for anything else a note says why nothing was saved."""
    fresh = models.create(config["model"], int(config["num_classes"]), aux_loss=bool(config.get("aux_loss", False)))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        row.notes.append(f"--save-model: not saved, the repaired model is not a plain {config['model']} (its weights "
                         "do not fit the architecture; e.g. it wraps the model)")
        return
    assert settings.save_model is not None
    provenance = jsonable({"name": row.defense, "params": settings.params or {}, "seed": int(settings.seed),
                           "from_run": str(run.run_dir), "data": str(run.data_path)})
    with atomic.atomic_dir(Path(settings.save_model)) as tmp:
        save_model(model, {**config, "defense": provenance}, tmp)
    row.saved_model = str(Path(settings.save_model))


def _score_result(row: DefenseRow, result: DefenseResult, before: dict[str, Any], run: LoadedRun,
                  settings: DefenseSettings, tmp: Path) -> None:
    """Each result kind scored by its own function; the after-scores once, for whatever changed predictions."""
    after_model = score_repair(result, row.defense, run.device, len(run.facts.classes))
    keep: tuple[nn.Module, dict[str, Any]] | None = (result.model, run.config) if after_model is not None else None
    retrained = False
    if result.flagged_train is not None:
        row.flagged, row.flagged_index = score_retrain(result, run.data, run.facts.n_train)
        if after_model is None:
            after_model, row.cost.retrain_seconds = retrain_without(run.config, run.data_path, row.flagged_index,
                                                                    run.facts.n_train, run.device, tmp,
                                                                    settings.train_progress)
            keep, retrained = (after_model, load_config(tmp / "retrained")), True
    filt = None
    if result.input_scores is not None:
        filt = score_filter(result, row.defense, run.data, settings.batch_size, settings.seed)
        row.detection, row.filter_scores = filt.detection, filt.scores
    if result.verdict is not None:
        row.verdict = score_verdict(result.verdict)
    if after_model is not None or filt is not None:
        part = score_after(after_model if after_model is not None else run.model, filt.rejects if filt else None,
                           before, run.data, run.device, settings.batch_size, (row.panel, row.benign_panel))
        row.after, row.der = part.after, part.der
        if part.rejected is not None:
            row.details.setdefault("rejected", part.rejected)
    if retrained and settings.random_control:
        _random_control(row, before, run, settings, tmp)
    if settings.save_model is not None and keep is not None:  # a filter or a verdict leaves the model as it was
        _save(row, keep[0], keep[1], run, settings)


def _old_call(defense: Any, run_dir: Any, data_path: Any, old: dict[str, Any]) -> DefenseRow:
    """``run_defense(defense, run_dir, data_path, device=..., before=..., seed=..., ...)``, the call before
    :class:`LoadedRun`: the pair is loaded here, for this one defense."""
    device, before = old.pop("device", "cpu"), old.pop("before", None)
    if data_path is None:
        raise TypeError("run_defense(defense, run_dir, data_path, ...) needs data_path")
    settings = DefenseSettings(**old)
    with load_pair(run_dir, data_path, device) as run:
        if before is not None:
            run.set_before(settings.batch_size, before)
        return run_defense(defense, run, settings)


def run_defense(defense: Any, run: LoadedRun, settings: DefenseSettings | None = None, **old: Any) -> DefenseRow:
    """Run ``defense`` on the model of ``run`` with its data's clean subset; score it; return its row.

    ``run``: the model and data file loaded once (:func:`load_pair`); several defenses may share it, each gets
    its own copy of the model, and the original model's scores ("before") are computed once.  The call of
    earlier versions, ``run_defense(defense, run_dir, data_path, device=..., before=..., **settings)``, still
    works.  A failure gives a row with ``error`` and ``error_source`` set (the caller decides the exit code).
    """
    if not isinstance(run, LoadedRun):
        return _old_call(defense, run, settings, old)
    settings = settings or DefenseSettings()
    if old:
        raise TypeError(f"run_defense() got unexpected keyword arguments {sorted(old)}; pass a DefenseSettings")
    name = str(getattr(defense, "name", type(defense).__name__))
    label = settings.attack if settings.attack is not None else model_attack_label(run.config, run.facts.attack)
    row = DefenseRow(model=settings.model_id or run.run_dir.name, attack=label, defense=name, run=str(run.run_dir),
                     data=str(run.data_path), cost=RunCost(budget_s=settings.budget_s, budget_passes=settings.budget_passes))
    before = run.before(settings.batch_size)
    row.before = scores_only(before)
    row.panel = panel_before(run.model, run.data, settings.panels, run.device, settings.batch_size)
    row.benign_panel = benign_panel_before(run.model, run.data, settings.panels, run.device, settings.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="defense-", dir=settings.work_dir))
    try:
        result = _run_behind_boundary(defense, row, run, settings)
        _score_result(row, result, before, run, settings, tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except DefenseFault as e:  # a failing defense is a result, not a crash of the bench
        row.fail(e.cause, "defense")
    except Exception as e:  # noqa: BLE001 — the testbed's own failure, reported as such
        row.fail(e, "testbed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row
