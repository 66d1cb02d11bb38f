"""Running the pairs of a bench: in this process, in N local processes, or as Ray tasks.

The executors and the scheduler are the zoo's (:mod:`testbed.execution.executors`, :mod:`testbed.execution.ray_backend`), so
``--workers``/``--backend ray`` mean the same for `testbed zoo build` and `testbed bench`.  A task is one
model × defense pair, named by its id; everything it needs is in ``REPORT/work/ID.job.json`` (written by the
parent before the task starts), so the same task runs in a spawned process or on another Ray node that sees
the report directory.  Each pair runs with a fixed thread count (``threads`` in the job): CPU results depend
on it, so the same pair gives the same numbers whether one worker or eight ran the bench.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed.core.errors import UserError
from testbed.execution.executors import Executor, ProcessExecutor

_BEFORE: dict[tuple[str, ...], dict[str, Any]] = {}  # this process's before-scores, per model and scoring setup


@dataclass
class PairJob:
    """One model × defense, as JSON (a job file): the model, the defense, the settings, the notes for its row."""

    out: str
    pid: str
    model: dict[str, Any]  # BenchModel fields (paths as strings)
    defense: str | None  # name or package.module:Class; None = an object handed over in this process
    name: str  # the defense's name
    params: dict[str, Any]
    settings: dict[str, Any]  # seed, budget_s, budget_passes, batch_size, threads, device, min_asr, ...
    key: dict[str, Any]  # what must match for a finished pair to be reused on resume
    notes: list[str] = field(default_factory=list)

    def write(self) -> None:
        from testbed.core import atomic

        atomic.write_text(job_path(self.out, self.pid), json.dumps(asdict(self), sort_keys=True) + "\n")

    @classmethod
    def read(cls, out: str | os.PathLike, pid: str) -> "PairJob":
        return cls(**json.loads(job_path(out, pid).read_text(encoding="utf-8")))


def job_path(out: str | os.PathLike, pid: str) -> Path:
    from testbed.bench.store import WORK

    return Path(out) / WORK / f"{pid}.job"


def progress_callback(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A defense's ``ctx.progress(fraction, message)`` as a percent bar whose postfix is the defense's message."""
    from testbed.core import progress

    bar = progress.bar(total=100, desc=desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")

    def update(fraction: float, message: str) -> None:
        try:
            target = int(100 * min(1.0, max(0.0, float(fraction))))
        except (TypeError, ValueError):
            return
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(str(message)[:60], refresh=False)

    return update, bar.close


def _before(model: dict[str, Any], run: Any, batch_size: int) -> dict[str, Any]:
    """The original model's scores, once per model and scoring setup in this process (``run``: its LoadedRun)."""
    key = (model["run_dir"], model["data_path"], str(run.device), str(batch_size), str(_threads()))
    if key not in _BEFORE:
        _BEFORE[key] = run.before(batch_size)
    return _BEFORE[key]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _finish_row(row: Any, job: PairJob, benign: bool, attack_params: dict[str, Any] | None) -> None:
    """What the bench adds to the runner's row: truth, the failed-attack guard, notes, settings, zoo keys."""
    from testbed.evaluation.attack_check import attack_failure
    from testbed.evaluation.rows import ZooKeys
    from testbed.bench.report import defense_figure_path

    m = job.model
    row.benign_model = bool(m["is_benign"]) if m.get("is_benign") is not None else benign
    failed = attack_failure((row.before or {}).get("ASR"), row.benign_model, job.settings["min_asr"])
    if row.benign_model is False and (row.before or {}).get("ASR") is not None:
        row.attack_implanted = failed is None
    if failed is not None:
        row.notes.insert(0, f"DER n/a: {failed}")
        row.der = row.der_random = None
    row.notes[:0] = job.notes
    row.settings = dict(job.settings)
    if m.get("group") is not None:
        row.zoo = ZooKeys(seed=int(m["seed"]), group=dict(m["group"]), attack_params=attack_params)
    else:
        row.attack_params = attack_params
    if row.saved_model is not None:  # relative to the report, which may move
        row.saved_model = os.path.relpath(row.saved_model, job.out)
    row.defense_figures = [defense_figure_path(row.model, row.defense, name) for name in row.figure_bytes]


def run_pair(job: PairJob, defense: Any = None, progress: bool = False) -> dict[str, Any]:
    """Run one pair, write its files into ``REPORT/work/``, and return what the parent prints."""
    from testbed.bench.store import ReportStore, write_pair
    from testbed.defenses.registry import load_defense
    from testbed.core.device import torch_threads
    from testbed.evaluation.runner import DefenseSettings, load_pair, run_defense
    from testbed.training.provenance import model_is_benign, trained_on

    s, m = job.settings, job.model
    with torch_threads(int(s["threads"])), load_pair(m["run_dir"], m["data_path"], s["device"]) as run:
        benign = model_is_benign(run.config, run.facts.is_poisoned)
        ds = trained_on(run.config)
        model_attack = ds.get("attack") if ds is not None and "attack" in ds else run.facts.attack
        run.set_before(s["batch_size"], _before(m, run, s["batch_size"]))
        if defense is None:
            defense = load_defense(job.defense, **job.params)
        cb, close = progress_callback(f"{m['id']} × {job.name}") if progress else (None, lambda: None)
        store = ReportStore(job.out)
        settings = DefenseSettings(seed=s["seed"], budget_s=s["budget_s"], budget_passes=s["budget_passes"], progress=cb,
                                   batch_size=s["batch_size"], model_id=m["id"], attack=m.get("attack"),
                                   train_progress=progress, random_control=s["random_control"], params=job.params,
                                   save_model=store.saved_model_dir(job.pid) if s["save_model"] else None)
        try:
            row = run_defense(defense, run, settings)
        finally:
            close()
        _finish_row(row, job, benign, model_attack.get("params") if model_attack else None)
        write_pair(store.work, job.pid, row, run.facts.classes, job.key)
    return {"status": "done", "id": job.pid, "error": row.error, "error_source": row.error_source,
            "traceback": (row.details or {}).get("traceback") if row.error else None, "row": row.to_json()}


def run_pair_file(out: str, pid: str, device: str | None = None) -> dict[str, Any]:
    """A worker's task: the pair described by ``REPORT/work/ID.job``; a failure outside the row becomes a result."""
    try:
        job = PairJob.read(out, pid)
        if device is not None:
            job.settings["device"] = device
        return run_pair(job)
    except UserError as e:
        return {"status": "failed", "id": pid, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported with its traceback; the other pairs go on
        return {"status": "failed", "id": pid, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _pool_task(out: str, pid: str, _stale_after: float) -> dict[str, Any]:
    return run_pair_file(out, pid)


def _ray_task(out: str, pid: str, device: str, _cpus: int, _stale_after: float) -> dict[str, Any]:
    import ray

    from testbed.core import progress

    progress.set_quiet(True)  # a Ray worker's stderr goes to the driver: its lines would interleave
    if device == "auto":
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    return run_pair_file(out, pid, device)


class InlinePairs(Executor):
    """This process, one pair at a time; defense objects (not only names) are allowed, with progress bars."""

    def __init__(self, jobs: dict[str, PairJob], objects: dict[str, Any], progress: bool):
        self.jobs, self.objects, self.progress = jobs, objects, progress
        self.results: dict[str, dict[str, Any]] = {}

    def start(self, pid: str) -> str:
        self.results[pid] = run_pair(self.jobs[pid], self.objects.get(pid), self.progress)
        return pid

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
        return [(h, self.results.pop(h)) for h in handles]


class ProcessPairs(ProcessExecutor):
    """``--workers N``: the zoo's process pool, running pairs instead of zoo entries."""

    def start(self, pid: str) -> Any:
        return self.pool.submit(_pool_task, self.zoo, pid, self.stale_after)


def make_executor(out: Path, workers: int, backend: str, ray_address: str | None, device: str, threads: int,
                  jobs: dict[str, PairJob], objects: dict[str, Any], progress: bool) -> Executor:
    """The executor for ``workers``/``backend``; several workers or Ray need defenses given by name."""
    from testbed.execution.claims import DEFAULT_STALE_AFTER

    if (workers > 1 or backend == "ray") and objects:
        raise UserError("--workers/--backend ray run each pair in another process, which can only load a defense by "
                        "name; pass defenses as names or package.module:Class, not as objects")
    if backend == "ray":
        from testbed.execution.ray_backend import RayExecutor

        return RayExecutor(out, ray_address, device, DEFAULT_STALE_AFTER, cpus_per_task=threads, task=_ray_task)
    if workers == 1:
        return InlinePairs(jobs, objects, progress)
    return ProcessPairs(out, workers, device, DEFAULT_STALE_AFTER, quiet=True)


def default_threads(workers: int, backend: str) -> int:
    """Cores of this machine ÷ workers (local), 1 per Ray task."""
    if backend == "ray":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def say_result(result: dict[str, Any], debug: bool, say: Callable[[str], None]) -> None:
    """The parent's line for a finished pair (and, for a failure, where it happened; the traceback with --debug)."""
    from testbed.evaluation.rows import DefenseRow, last_frames

    if result.get("status") != "done":
        say(f"{result.get('id')}: TESTBED ERROR, the pair could not run ({result.get('error')})")
        if debug and result.get("traceback"):
            print(result["traceback"], file=sys.stderr, end="")
        return
    from testbed.bench.run import summary_line

    row = DefenseRow.from_json(result["row"])
    say(summary_line(row))
    tb = result.get("traceback")
    if tb:
        if debug:
            print(tb, file=sys.stderr, end="" if tb.endswith("\n") else "\n")
        else:
            frames = last_frames(tb, 1)
            if frames:
                say(f"  at {frames[0]}  (full traceback: --debug, or details.traceback in results.json)")
