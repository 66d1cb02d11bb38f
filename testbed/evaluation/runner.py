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

Defense loading lives in :mod:`testbed.defenses.registry`; the names below are re-exported for callers
that import them from here.
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
from testbed.core.device import resolve_device
from testbed.core.errors import UserError
from testbed.core.jsonutil import jsonable
from testbed.data.h5data import open_dataset
from testbed.defense import DefenseResult
from testbed.defenses.registry import ENTRY_POINT_GROUP, builtin_defenses, load_defense, parse_params
from testbed.evaluation.rows import DefenseRow, RunCost, public_row
from testbed.evaluation.scoring import (
    DefenseFault, benign_panel_before, blame_defense, panel_before, protocol_error, random_removal,
    retrain_without, score_after, score_filter, score_repair, score_retrain, score_verdict, scores_only,
    take_figures,
)
from testbed.evaluation.threat_model import Progress, clean_subset, make_context
from testbed.evaluation.variants import score_variants
from testbed.scoring.scorer import SCORE_KEYS, score_model
from testbed.training.provenance import model_attack_label
from testbed.training.runs import load_config, load_run, save_model

PANEL_IMAGES = 3  # attacked (and as many benign) test images kept for Figure-1-style panels

__all__ = ["ENTRY_POINT_GROUP", "PANEL_IMAGES", "SCORE_KEYS", "DefenseRow", "builtin_defenses", "clean_subset",
           "jsonable", "load_defense", "make_context", "parse_params", "public_row", "run_defense"]


@dataclass
class _Job:
    """Everything one defense run needs, resolved once."""

    run_dir: Path
    data_path: Path
    device: torch.device
    seed: int
    batch_size: int
    config: dict[str, Any]  # the run's config.json
    classes: list[str]
    n_train: int
    work_dir: Path | None = None
    train_progress: bool = False
    random_control: bool = True
    save_model: Path | None = None
    provenance: dict[str, Any] | None = None  # what a saved model's config records about the defense


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _open(run_dir: Path, data_path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The original model, its run config, and the data's classes, attack record and training-set size."""
    with open_dataset(data_path, check_labels=False) as f:
        facts = {"classes": list(f.classes), "attack": f.attack, "n_train": f.length("train")}
    original, config = load_run(run_dir, device)
    if list(config.get("classes") or facts["classes"]) != facts["classes"]:
        raise UserError(f"{run_dir} was trained on other classes than {data_path} has; defend it with the data it was trained on")
    return original, config, facts


def _run_behind_boundary(defense: Any, row: DefenseRow, job: _Job, budget_s: float | None,
                         budget_passes: int | None, progress: Progress | None) -> DefenseResult:
    """The defense on a fresh copy of the model, seeing only its context; its cost and details go in ``row``."""
    model, _ = load_run(job.run_dir, job.device)
    ctx = make_context(defense, job.data_path, device=job.device, seed=job.seed, budget_s=budget_s,
                       budget_passes=budget_passes, progress=progress)
    _seed_everything(job.seed)
    t0 = time.perf_counter()
    try:
        result = blame_defense(defense.run, model, ctx)
    finally:
        seconds = time.perf_counter() - t0
        row.cost.seconds = round(seconds, 4)
        row.cost.over_budget = None if budget_s is None else bool(seconds > budget_s)
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
    stopped = row.details.get("stopped_by")
    row.cost.stopped_by = stopped if stopped in ("passes", "seconds") else None
    score_variants(row.details, job.run_dir, job.data_path, job.device, job.batch_size)
    return result


def _random_control(row: DefenseRow, before: dict[str, Any], job: _Job, tmp: Path) -> None:
    """Retrain without a random subset of the same size as the flagged one: ``after_random`` beside ``after``."""
    count = int(row.flagged.count)
    if count == 0:  # nothing removed: the control is the same training set, so the same model
        row.after_random, row.der_random = row.after, row.der
        return
    removed = random_removal(job.n_train, count, job.seed)
    model, _ = retrain_without(job.config, job.data_path, removed, job.n_train, job.device, tmp, job.train_progress,
                               name="retrained-random")
    part = score_after(model, None, before, job.data_path, job.device, job.batch_size)
    row.after_random, row.der_random = part.after, part.der


def _save(row: DefenseRow, model: nn.Module, config: dict[str, Any], job: _Job) -> None:
    """Keep the model scored "after" as a run directory (safetensors + config.json) at ``job.save_model``.

    Only a model of the run's own architecture can be a run (a wrapper around it, like an input filter built
    into the forward, has other weights); for anything else a note says why nothing was saved."""
    fresh = models.create(config["model"], int(config["num_classes"]), aux_loss=bool(config.get("aux_loss", False)))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        row.notes.append(f"--save-model: not saved, the repaired model is not a plain {config['model']} (its weights "
                         "do not fit the architecture; e.g. it wraps the model)")
        return
    assert job.save_model is not None
    with atomic.atomic_dir(job.save_model) as tmp:
        save_model(model, {**config, "defense": job.provenance}, tmp)
    row.saved_model = str(job.save_model)


def _score_result(row: DefenseRow, result: DefenseResult, original: nn.Module, before: dict[str, Any], job: _Job,
                  tmp: Path) -> None:
    """Each result kind scored by its own function; the after-scores once, for whatever changed predictions."""
    after_model = score_repair(result, row.defense, job.device, len(job.classes))
    keep: tuple[nn.Module, dict[str, Any]] | None = (result.model, job.config) if after_model is not None else None
    retrained = False
    if result.flagged_train is not None:
        row.flagged, row.flagged_index = score_retrain(result, job.data_path, job.n_train)
        if after_model is None:
            after_model, row.cost.retrain_seconds = retrain_without(job.config, job.data_path, row.flagged_index,
                                                                    job.n_train, job.device, tmp, job.train_progress)
            keep, retrained = (after_model, load_config(tmp / "retrained")), True
    filt = None
    if result.input_scores is not None:
        filt = score_filter(result, row.defense, job.data_path, job.batch_size, job.seed)
        row.detection, row.filter_scores = filt.detection, filt.scores
    if result.verdict is not None:
        row.verdict = score_verdict(result.verdict)
    if after_model is not None or filt is not None:
        part = score_after(after_model if after_model is not None else original, filt.rejects if filt else None, before,
                           job.data_path, job.device, job.batch_size, (row.panel, row.benign_panel))
        row.after, row.der = part.after, part.der
        if part.rejected is not None:
            row.details.setdefault("rejected", part.rejected)
    if retrained and job.random_control:
        _random_control(row, before, job, tmp)
    if job.save_model is not None and keep is not None:  # a filter or a verdict leaves the model as it was
        _save(row, keep[0], keep[1], job)


def run_defense(
    defense: Any,
    run_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    budget_s: float | None = None,
    budget_passes: int | None = None,
    progress: Progress | None = None,
    batch_size: int = 32,
    before: dict[str, Any] | None = None,
    model_id: str | None = None,
    attack: str | None = None,
    work_dir: str | os.PathLike | None = None,
    panels: int = PANEL_IMAGES,
    train_progress: bool = False,
    random_control: bool = True,
    save_model: str | os.PathLike | None = None,
    params: dict[str, Any] | None = None,
) -> DefenseRow:
    """Run ``defense`` on the model in ``run_dir`` with ``data_path``'s clean subset; score it; return its row.

    ``before``: scores of the original model on ``data_path`` when already known (bench reuses them across
    defenses).  ``random_control``: for a training-set defense, also retrain without a random subset of the
    same size (``after_random``).  ``save_model``: a directory to keep the repaired or retrained model in, as
    a run (``params`` are recorded in its config).  ``attack`` labels the row; by default the attack the model
    was trained with.  A failure gives a row with ``error`` and ``error_source`` set (the caller decides the
    exit code).
    """
    device = resolve_device(device)
    run_dir, data_path = Path(run_dir), Path(data_path)
    original, config, facts = _open(run_dir, data_path, device)
    name = str(getattr(defense, "name", type(defense).__name__))
    job = _Job(run_dir, data_path, device, int(seed), batch_size, config, facts["classes"], facts["n_train"],
               Path(work_dir) if work_dir is not None else None, train_progress, random_control,
               Path(save_model) if save_model is not None else None,
               jsonable({"name": name, "params": params or {}, "seed": int(seed), "from_run": str(run_dir),
                         "data": str(data_path)}))
    label = attack if attack is not None else model_attack_label(config, facts["attack"])
    row = DefenseRow(model=model_id or run_dir.name, attack=label, defense=name, run=str(run_dir), data=str(data_path),
                     cost=RunCost(budget_s=budget_s, budget_passes=budget_passes))
    if before is None:
        before = score_model(original, data_path, device=device, batch_size=batch_size)
    row.before = scores_only(before)
    row.panel = panel_before(original, data_path, panels, device, batch_size)
    row.benign_panel = benign_panel_before(original, data_path, panels, device, batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="defense-", dir=job.work_dir))
    try:
        result = _run_behind_boundary(defense, row, job, budget_s, budget_passes, progress)
        _score_result(row, result, original, before, job, tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except DefenseFault as e:  # a failing defense is a result, not a crash of the bench
        row.fail(e.cause, "defense")
    except Exception as e:  # noqa: BLE001 — the testbed's own failure, reported as such
        row.fail(e, "testbed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row
