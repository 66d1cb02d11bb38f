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
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from testbed.bench.markdown import no_gain_row
from testbed.bench.report import defense_figure_path
from testbed.bench.settings import BenchSettings, Execution
from testbed.bench.store import WORK, ReportStore, write_pair
from testbed.core import atomic, progress
from testbed.core.device import cpu_bf16_support, torch_threads, usable_cores
from testbed.core.errors import UserError
from testbed.defenses.registry import load_defense
from testbed.evaluation.attack_check import attack_failure
from testbed.evaluation.loaded import LoadedRun
from testbed.evaluation.rows import DefenseRow, ZooKeys, last_frames
from testbed.evaluation.runner import DefenseSettings, load_pair, run_defense
from testbed.execution.claims import DEFAULT_STALE_AFTER
from testbed.execution.executors import Executor, ProcessExecutor
from testbed.execution.ray_backend import RayExecutor
from testbed.training.provenance import model_is_benign, trained_on

# this process's before-scores, keyed by what they depend on: the weights' and the data's content, the device,
# the batch size and the thread count (a file replaced at the same path is scored afresh)
_BEFORE: dict[tuple[str, ...], dict[str, Any]] = {}


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
        atomic.write_text(job_path(self.out, self.pid), json.dumps(asdict(self), sort_keys=True) + "\n")

    @classmethod
    def read(cls, out: str | os.PathLike, pid: str) -> "PairJob":
        return cls(**json.loads(job_path(out, pid).read_text(encoding="utf-8")))


def job_path(out: str | os.PathLike, pid: str) -> Path:
    return Path(out) / WORK / f"{pid}.job"


def progress_callback(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A defense's ``ctx.progress(fraction, message)`` as a percent bar whose postfix is the defense's message."""
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


def _before(run: LoadedRun, batch_size: int) -> tuple[dict[str, Any], float]:
    """The original model's scores, once per weights, data, device, batch size and thread count in this process,
    and the CPU seconds this call spent on them (0 when they were cached: the model's first pair here paid)."""
    key = (run.weights_digest(), run.data_digest(), str(run.device), str(batch_size), str(torch.get_num_threads()))
    cpu0 = time.process_time()
    if key not in _BEFORE:
        _BEFORE[key] = run.before(batch_size)
    return _BEFORE[key], time.process_time() - cpu0


def no_gain(asr: float | None, floor: dict[str, Any] | None) -> str | None:
    """Why an attacked model's ASR measures no backdoor: it does not exceed the benign floor (the ASR the zoo's
    benign model of the same architecture and seed scores on the same attacked test set); None otherwise."""
    if asr is None or floor is None or float(asr) > float(floor["ASR"]):
        return None
    return (f"no gain over the benign model: ASR {float(asr):.1f}% before any defense is not above the "
            f"{float(floor['ASR']):.1f}% that the zoo's benign model {floor['entry']} scores on the same attacked test "
            "set, so it measures no backdoor")


def _finish_row(row: Any, job: PairJob, benign: bool, attack_params: dict[str, Any] | None) -> None:
    """What the bench adds to the runner's row: truth, the failed-attack guards (``--min-asr``, then a zoo's
    benign floor), notes, settings, zoo keys."""
    m = job.model
    row.benign_model = bool(m["is_benign"]) if m.get("is_benign") is not None else benign
    asr = (row.before or {}).get("ASR")
    failed = attack_failure(asr, row.benign_model, job.settings["min_asr"])
    if row.benign_model is False and asr is not None:
        row.benign_floor = m.get("benign_floor")
        failed = failed or no_gain(asr, row.benign_floor)
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
    s, m = job.settings, job.model
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch_threads(int(s["threads"])), load_pair(m["run_dir"], m["data_path"], s["device"]) as run:
        benign = model_is_benign(run.config, run.facts.is_poisoned)
        ds = trained_on(run.config)
        model_attack = ds.get("attack") if ds is not None and "attack" in ds else run.facts.attack
        before, before_cpu = _before(run, s["batch_size"])
        run.set_before(s["batch_size"], before)
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
        row.cost.pair_seconds = round(time.perf_counter() - t0, 3)
        row.cost.pair_cpu_seconds = round(time.process_time() - cpu0, 3)
        row.cost.before_cpu_seconds = round(before_cpu, 3)
        row.cost.measured_on = cpu_bf16_support()["model"]  # a resumed bench may span machines
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


def _process_task(out: str, pid: str, _device: str, _threads: int | None, _progress: bool,
                  _stale_after: float) -> dict[str, Any]:
    """A pair in a worker process of :class:`~testbed.execution.executors.ProcessExecutor` (device and threads
    come from the job)."""
    return run_pair_file(out, pid)


def _ray_task(out: str, pid: str, device: str, _cpus: int, _stale_after: float) -> dict[str, Any]:
    import ray

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


def make_executor(out: Path, execution: Execution, settings: BenchSettings, jobs: dict[str, PairJob],
                  objects: dict[str, Any]) -> Executor:
    """The executor for ``execution`` (``settings``: the resolved device and threads); several workers or Ray
    need defenses given by name."""
    workers, backend = execution.workers, execution.backend
    if (workers > 1 or backend == "ray") and objects:
        raise UserError("--workers/--backend ray run each pair in another process, which can only load a defense by "
                        "name; pass defenses as names or package.module:Class, not as objects")
    if backend == "ray":
        return RayExecutor(out, execution.ray_address, settings.device, DEFAULT_STALE_AFTER,
                           cpus_per_task=int(settings.threads or 1), task=_ray_task)
    if workers == 1:
        return InlinePairs(jobs, objects, execution.progress)
    return ProcessExecutor(out, workers, settings.device, DEFAULT_STALE_AFTER, quiet=True, task=_process_task)


def default_threads(workers: int, backend: str) -> int:
    """Cores of this machine ÷ workers (local), 1 per Ray task."""
    if backend == "ray":
        return 1
    return max(1, usable_cores() // workers)


def say_result(result: dict[str, Any], debug: bool, say: Callable[[str], None]) -> None:
    """The parent's line for a finished pair (and, for a failure, where it happened; the traceback with --debug)."""
    if result.get("status") != "done":
        say(f"{result.get('id')}: TESTBED ERROR, the pair could not run ({result.get('error')})")
        if debug and result.get("traceback"):
            print(result["traceback"], file=sys.stderr, end="")
        return
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
        der = _f(row.der, 3) if row.attack_implanted is not False else "n/a (attack did not implant)"
        if no_gain_row(row):
            der = f"n/a (no gain over the benign model's ASR {row.benign_floor['ASR']:.1f})"
        parts.append(f"ASR {_f(b.get('ASR'))} → {_f(a.get('ASR'))}, mIoU-B {_f(b.get('mIoU-B'))} → {_f(a.get('mIoU-B'))}, "
                     f"DER {der}")
    if row.after_random:
        parts.append(f"(random-removal control: ASR {_f(row.after_random.get('ASR'))}, mIoU-B "
                     f"{_f(row.after_random.get('mIoU-B'))})")
    if row.detection:
        d = row.detection
        parts.append(f"TPR {_f(d.tpr, 3)} FPR {_f(d.fpr, 3)} AUROC {_f(d.auroc, 3)}" + (" (confounded)" if d.confounded else ""))
    if row.flagged:
        fl = row.flagged
        parts.append(f"flagged {fl.count} (precision {_f(fl.precision, 3)}, recall {_f(fl.recall, 3)})")
    if row.verdict:
        v = row.verdict
        cov = f", coverage {v.coverage:.2f}" if v.coverage is not None else ""
        parts.append(f"verdict {v.status} (score {_f(v.score)}{cov})")
    stop = f" (stopped by the {row.cost.stopped_by} budget)" if row.cost.stopped_by else ""
    parts.append(f"defense {_f(row.cost.seconds, 1)} s" + (" (over budget)" if row.cost.over_budget else "") + stop)
    return " ".join(parts)
