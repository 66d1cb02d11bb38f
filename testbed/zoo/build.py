"""Building a zoo: data once, each poisoned set once, each entry trained once, resumable after any crash.

Order of work: (1) the clean dataset ``data/clean.h5``; (2) every poisoned dataset the grid needs, named by
its content key (sha256 of the clean data's content hash + the attack's parameters + poisoning seed), so
entries that need the same one share it; (3) the entries, scheduled on inline/process/Ray workers.  Every
unit of work is guarded by a claim (:mod:`testbed.zoo.claims`) and finished by an atomic marker (a dataset's
``data/NAME.json``, an entry's ``done.json``), so a killed build is simply run again: finished work is
skipped, an unfinished entry resumes from its last epoch checkpoint, work a live builder holds is waited for.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed import atomic
from testbed.errors import UserError
from testbed.zoo import manifest as mf
from testbed.zoo.claims import DEFAULT_STALE_AFTER, Claim, break_stale, me, zoo_lock
from testbed.zoo.spec import ZooSpec, parse_spec

POLL_S = 1.0
# Torch threads per entry unless told otherwise.  CPU results depend on the thread count (a convolution's
# reductions are split per thread), so it is fixed per entry rather than derived from how many entries run
# at once: a zoo built by one worker or by eight gives the same bytes.  One thread per process is also the
# fastest use of a small CPU for tiny models (BENCHMARKS.md, P8).
DEFAULT_THREADS = 1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(threads: int = DEFAULT_THREADS, device: str = "auto") -> int:
    """``--workers auto``: one worker per GPU when entries train on CUDA, else usable cores ÷ threads per worker."""
    if device != "cpu":
        import torch

        if torch.cuda.is_available() and (device == "auto" or device.startswith("cuda")):
            return torch.cuda.device_count() if device in ("auto", "cuda") else 1
    return max(1, usable_cores() // max(1, int(threads)))


@dataclass
class BuildResult:
    done: list[str] = field(default_factory=list)  # finished by this build
    skipped: list[str] = field(default_factory=list)  # already finished before it started
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- datasets -------------------------------------------------------------------------------------
def _ensure_dataset(zoo: Path, name: str, definition: dict[str, Any], make: Callable[[Path], None],
                    stale_after: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Build ``data/NAME.h5`` once (whoever claims it first); others wait for its record."""
    record_path = mf.dataset_record(zoo, name)
    waited = False
    while True:
        record = mf.read_json(record_path)
        if record is not None:
            if record.get("definition") != definition:
                raise UserError(f"{zoo}/data/{name}.h5 was built from a different definition than this spec asks for; "
                                "use a new --out for a different data source")
            return record
        claim = Claim(mf.data_dir(zoo) / f"{name}.claim", zoo, stale_after)
        if claim.acquire():
            try:
                if mf.read_json(record_path) is None:
                    say(f"building data/{name}.h5")
                    final = mf.dataset_file(zoo, name)
                    with atomic.atomic_file(final, suffix=".h5") as tmp:
                        tmp.unlink()  # the makers write a new file (and refuse to overwrite some inputs)
                        make(tmp)
                    from testbed.h5data import content_hash

                    atomic.write_json(record_path, {
                        "name": name, "file": f"data/{name}.h5", "sha256": mf.file_sha256(final),
                        "content_hash": content_hash(final), "bytes": final.stat().st_size,
                        "definition": definition, "built": _now(),
                    })
            finally:
                claim.release()
            continue
        if not waited:
            say(f"waiting for another builder to finish data/{name}.h5")
            waited = True
        time.sleep(POLL_S)


def _make_clean(data: dict[str, Any]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        if "synth" in data:
            from testbed.synth import make_synth_dataset

            make_synth_dataset(tmp, **data["synth"])
        else:
            shutil.copyfile(data["path"], tmp)

    return make


def _make_poisoned(clean: Path, kwargs: dict[str, Any]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        from testbed import attacks

        attacks.poison_file(clean, tmp, **kwargs)

    return make


def poisoned_name(clean_hash: str, kwargs: dict[str, Any]) -> str:
    """A poisoned dataset's name is a key over its content: clean content + attack parameters + seed."""
    return "poisoned-" + hashlib.sha256(mf.canonical({"parent": clean_hash, "poison": kwargs})).hexdigest()[:16]


def prepare(spec: ZooSpec, zoo: Path, stale_after: float = DEFAULT_STALE_AFTER,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Datasets built (or found) and ``plan.json`` merged: everything workers need to train entries.

    Everything that can be refused is refused before anything is written: a ``zoo`` that is not a zoo, one built
    from other settings, one whose finished work no longer matches its manifest, outputs over inputs.
    """
    zoo = Path(zoo)
    check_out(spec, zoo)
    created = not zoo.exists()
    try:
        for d in (zoo, mf.data_dir(zoo), mf.entries_dir(zoo)):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the zoo {zoo} ({e.strerror or e}); choose a writable --out") from None
    for d in (mf.data_dir(zoo), mf.entries_dir(zoo)):  # what killed builders left behind
        atomic.sweep_stale(d)
        for claim in d.glob("*.claim"):
            break_stale(claim, zoo, stale_after)
    try:
        return _prepare(spec, zoo, stale_after, say)
    except BaseException:
        if created and not any(f != ".lock" for _, _, files in os.walk(zoo) for f in files):
            shutil.rmtree(zoo, ignore_errors=True)  # a first build that wrote nothing leaves nothing
        raise


def _prepare(spec: ZooSpec, zoo: Path, stale_after: float, say: Callable[[str], None]) -> dict[str, Any]:
    clean = _ensure_dataset(zoo, "clean", {"source": spec.data_definition()}, _make_clean(spec.data), stale_after, say)
    clean_path = mf.dataset_file(zoo, "clean")
    names: dict[tuple[str, int], str] = {}
    for e in spec.entries:
        for v in ([e.variant] if not e.is_benign else [x for x in spec.variants if not x.is_benign]):
            key = (v.label, e.seed)
            if key in names:
                continue
            kwargs = v.poison_kwargs(e.seed)
            name = poisoned_name(clean["content_hash"], kwargs)
            _ensure_dataset(zoo, name, {"parent_content_hash": clean["content_hash"], "poison": kwargs},
                            _make_poisoned(clean_path, kwargs), stale_after, say)
            names[key] = name
    rows = {}
    for e in spec.entries:
        row: dict[str, Any] = {"definition": e.definition()}
        if e.is_benign:
            row["data"] = "clean"
            row["reference"] = {v.label: names[(v.label, e.seed)] for v in spec.variants if not v.is_benign}
        else:
            row["data"] = names[(e.variant.label, e.seed)]
        rows[e.id] = row
    with zoo_lock(zoo):
        plan = _check_plan(zoo, spec)
        for eid, row in rows.items():
            if eid not in plan["entries"]:
                plan["order"].append(eid)
            plan["entries"][eid] = row
        atomic.write_json(zoo / mf.PLAN, plan)
    mf.write_manifest(zoo)
    return plan


def check_out(spec: ZooSpec, zoo: Path) -> None:
    """Refuse ``zoo`` as --out before anything is written there (see :func:`prepare`)."""
    from testbed.guards import check_outputs

    if zoo.exists() and not zoo.is_dir():
        raise UserError(f"--out {zoo} is a file; choose a directory")
    outputs = [("--out", zoo / d) for d in ("data", "entries", mf.PLAN, mf.MANIFEST)]
    check_outputs(outputs, {"the spec": spec.path, "[data] path": spec.data.get("path")})
    _check_plan(zoo, spec)
    _dry_run_attacks(spec, zoo)
    problems = mf.adoption_problems(zoo) if zoo.is_dir() else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{zoo}: finished work no longer matches the manifest: {problems[0]}{more}; a rebuild would "
                        f"bless it: run `testbed zoo verify {zoo}`, then restore the files or delete the damaged "
                        "entries/ID directory (or data/NAME.*) to rebuild it")


def _dry_run_attacks(spec: ZooSpec, zoo: Path) -> None:
    """Run every poisoning recipe's checks and selections against the clean data, writing nothing.

    What needs the data (a rate above the candidates, a BadNets target image out of range) fails here, before
    the zoo is created.  The clean data is the zoo's own when it exists, the spec's file, or synthetic scenes
    made in a temporary directory outside the zoo (deterministic: the build makes the same bytes).
    """
    import tempfile

    from testbed.zoo.attack_table import dry_run

    recipes = [v for v in spec.variants if not v.is_benign]
    if not recipes:
        return
    existing = mf.dataset_file(zoo, "clean")
    with tempfile.TemporaryDirectory(prefix="zoo-dry-run-") as tmp:
        if existing.is_file():
            clean = existing
        elif "path" in spec.data:
            clean = Path(spec.data["path"])
        else:
            clean = Path(tmp) / "clean.h5"
            _make_clean(spec.data)(clean)
        for v in recipes:
            where = f"[[attack]] {v.attack_id!r}" + (f" (grid {v.label})" if v.label != v.attack_id else "")
            dry_run(clean, v.params, v.seed if v.seed is not None else 0, where, spec.path)


def _foreign(zoo: Path) -> list[Path]:
    """What in ``zoo`` a killed first build (before plan.json) could not have written."""
    if not zoo.is_dir():
        return []
    ours = {"data", "entries", ".lock"}
    out = [p for p in zoo.iterdir() if p.name not in ours]
    if mf.entries_dir(zoo).is_dir():
        out += [p for p in mf.entries_dir(zoo).iterdir() if not p.name.startswith(".")]
    if mf.data_dir(zoo).is_dir():
        out += [p for p in mf.data_dir(zoo).iterdir() if not (p.name.startswith((".", "clean.", "poisoned-")))]
    return out


def _check_plan(zoo: Path, spec: ZooSpec) -> dict[str, Any]:
    plan = mf.load_plan(zoo) if (zoo / mf.PLAN).exists() else None
    if plan is None:
        foreign = _foreign(zoo)
        if foreign:
            raise UserError(f"--out {zoo} holds files but is not a zoo (e.g. {foreign[0].name}); choose an empty or "
                            "new directory")
        return {"format": mf.FORMAT, "version": mf.VERSION, "data": spec.data_definition(), "order": [], "entries": {}}
    if plan.get("data") != spec.data_definition():
        raise UserError(f"{zoo} was built from other data ({json.dumps(plan.get('data'))}); use a new --out for this spec")
    for e in spec.entries:
        old = plan["entries"].get(e.id)
        if old is not None and old["definition"] != e.definition():
            raise UserError(f"{zoo}: entry {e.id} exists with other settings than this spec gives it; "
                            "use a new --out (or restore the spec it was built from)")
    return plan


# -- one entry ------------------------------------------------------------------------------------
def _append_log(path: Path, record: dict[str, Any]) -> None:
    old = path.read_text() if path.is_file() else ""
    atomic.write_text(path, old + json.dumps(record) + "\n")


def _epochs_done(run_dir: Path) -> int:
    log = run_dir / "train_log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0


def _finish_stray(zoo: Path, entry_id: str) -> None:
    """A builder killed right after done.json leaves the checkpoint behind; it is not part of the zoo."""
    (mf.entry_dir(zoo, entry_id) / "checkpoint.pt").unlink(missing_ok=True)


def _entry_files(edir: Path) -> dict[str, str]:
    """The hashes done.json records: every file of a finished entry but done.json itself and the checkpoint."""
    return {p.name: mf.file_sha256(p) for p in sorted(edir.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in (mf.DONE, "checkpoint.pt")}


def _score_references(zoo: Path, edir: Path, wanted: dict[str, str], dev: Any, batch_size: int) -> dict[str, Any]:
    """A benign entry scored on each attack's test set (the paper's "Benign" rows), added to its reference.json.

    ``wanted`` maps attack ids to dataset names; scores already in reference.json are kept, so a resumed build
    only scores the attacks added to the grid since.  Returns the summaries of all of them.
    """
    from testbed.runs import load_run
    from testbed.scoring import score_model

    if not wanted:
        return {}
    full = mf.read_json(edir / mf.REFERENCE) or {}
    missing = {label: name for label, name in wanted.items() if label not in full}
    if missing:
        model, _ = load_run(edir, dev)
        full.update({label: score_model(model, mf.dataset_file(zoo, name), dev, batch_size=max(32, batch_size))
                     for label, name in missing.items()})
        atomic.write_json(edir / mf.REFERENCE, _jsonable(full))
    return {label: mf.summary(full[label]) for label in wanted}


def stale_references(zoo: Path, entry_id: str) -> list[str]:
    """Attack ids a finished benign entry has no reference scores for (attacks added to the grid after it was built)."""
    row = mf.load_plan(zoo)["entries"][entry_id]
    done = mf.read_json(mf.entry_dir(zoo, entry_id) / mf.DONE) or {}
    have = done.get("reference") or {}
    return [label for label in (row.get("reference") or {}) if label not in have]


def refresh_references(zoo: Path, entry_id: str, device: str = "auto", threads: int | None = None,
                       stale_after: float = DEFAULT_STALE_AFTER) -> list[str]:
    """Score a finished benign entry on the attacks added since it was built; done.json and the manifest follow.

    Returns the attack ids scored now (empty when nothing was stale or another builder holds the entry).
    """
    import torch

    from testbed.device import resolve_device

    zoo = Path(zoo)
    edir = mf.entry_dir(zoo, entry_id)
    claim = Claim(mf.entry_claim(zoo, entry_id), zoo, stale_after)
    if not stale_references(zoo, entry_id) or not claim.acquire():
        return []
    previous_threads = torch.get_num_threads()
    try:
        missing = stale_references(zoo, entry_id)
        problems = mf.entry_file_problems(zoo, entry_id)
        if problems:  # never re-seal a tampered entry with fresh hashes
            raise UserError(f"entry {entry_id}: {problems[0]}; not rescoring it: run `testbed zoo verify {zoo}`")
        if threads:
            torch.set_num_threads(int(threads))
        row = mf.load_plan(zoo)["entries"][entry_id]
        done = mf.read_json(edir / mf.DONE)
        batch = int(row["definition"]["train"].get("batch_size", 8))
        done["reference"] = _score_references(zoo, edir, row["reference"], resolve_device(device), batch)
        _append_log(edir / mf.ZOO_LOG, {"event": "reference", "scored": missing, "time": _now(), **me()})
        done["files"] = _entry_files(edir)  # reference.json and zoo_log.jsonl changed
        atomic.write_json(edir / mf.DONE, _jsonable(done))
    finally:
        claim.release()
        torch.set_num_threads(previous_threads)
    mf.write_manifest(zoo, rescored={entry_id})
    return missing


def build_entry(zoo: str | os.PathLike, entry_id: str, device: str = "auto", threads: int | None = None,
                progress: bool = False, stale_after: float = DEFAULT_STALE_AFTER) -> dict[str, Any]:
    """Train and score one entry unless it is finished or a live builder holds it.

    Returns ``{"id", "status": "done"|"busy", ...}``; errors propagate (the scheduler records them).
    """
    import torch

    from testbed.device import resolve_device

    zoo = Path(zoo)
    plan = mf.load_plan(zoo)
    row = plan["entries"][entry_id]
    d = row["definition"]
    edir = mf.entry_dir(zoo, entry_id)
    if (edir / mf.DONE).is_file():
        return {"id": entry_id, "status": "done", "already": True}
    claim = Claim(mf.entry_claim(zoo, entry_id), zoo, stale_after)
    if not claim.acquire():
        return {"id": entry_id, "status": "busy", "holder": {k: v for k, v in (claim.holder or {}).items() if not k.startswith("_")}}
    t0 = time.time()
    previous_threads = torch.get_num_threads()
    try:
        if (edir / mf.DONE).is_file():
            return {"id": entry_id, "status": "done", "already": True}
        if threads:
            torch.set_num_threads(int(threads))  # the bytes depend on it: see DEFAULT_THREADS
        dev = resolve_device(device)
        edir.mkdir(parents=True, exist_ok=True)
        existing = mf.read_json(edir / mf.ENTRY_DEF)
        if existing is None:
            atomic.write_json(edir / mf.ENTRY_DEF, d)
        elif existing != d:
            raise UserError(f"{edir}/{mf.ENTRY_DEF} describes other settings than plan.json; the zoo is inconsistent, use a new --out")
        resume = (edir / "checkpoint.pt").is_file()
        _append_log(edir / mf.ZOO_LOG, {"event": "start", "resume": resume, "from_epoch": _epochs_done(edir) if resume else 0,
                                        "threads": torch.get_num_threads(), "time": _now(), **me()})
        from testbed.runs import load_run
        from testbed.scoring import score_model
        from testbed.train import TrainConfig, train

        cfg = TrainConfig(**{**d["train"], "device": str(dev)})
        data = mf.dataset_file(zoo, row["data"])
        try:
            train(data, edir, cfg, resume=resume, overwrite=not resume, progress=progress, score=True)
        except UserError as e:
            if not (resume and ("--resume" in str(e) or "--overwrite" in str(e))):
                raise
            why = str(e).split("; ")[0]  # the trainer's own advice names its CLI flags, which do not apply here
            raise UserError(f"entry {entry_id} cannot resume ({why}); delete {edir / 'checkpoint.pt'} to train it "
                            "from the start, then run `testbed zoo build` again") from None
        metrics = mf.read_json(edir / "metrics.json")
        if metrics is None:  # the trainer could not score (no scorer installed): score here
            model, _ = load_run(edir, dev)
            metrics = score_model(model, data, dev, batch_size=max(32, cfg.batch_size))
        reference = _score_references(zoo, edir, row.get("reference") or {}, dev, cfg.batch_size)
        _append_log(edir / mf.ZOO_LOG, {"event": "finish", "time": _now(), "seconds": round(time.time() - t0, 3), **me()})
        done = {"id": entry_id, "metrics": mf.summary(metrics), "reference": reference or None,
                "files": _entry_files(edir), "finished": _now(), "seconds": round(time.time() - t0, 3), "builder": me()}
        atomic.write_json(edir / mf.DONE, _jsonable(done))
        _finish_stray(zoo, entry_id)
    finally:
        claim.release()
        torch.set_num_threads(previous_threads)
    mf.write_manifest(zoo)
    return {"id": entry_id, "status": "done", "metrics": mf.summary(metrics), "seconds": round(time.time() - t0, 1)}


def _jsonable(obj: Any) -> Any:
    """Scorer output → plain JSON (tensors/arrays to lists, NaN to None)."""
    import math

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_entry_safe(zoo: str, entry_id: str, device: str, threads: int | None, progress: bool,
                   stale_after: float) -> dict[str, Any]:
    """``build_entry`` that turns any failure into a result, so one bad entry does not stop the zoo."""
    try:
        return build_entry(zoo, entry_id, device, threads, progress, stale_after)
    except UserError as e:
        return {"id": entry_id, "status": "failed", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported per entry, with the traceback on stderr
        traceback.print_exc(file=sys.stderr)
        return {"id": entry_id, "status": "failed", "error": f"{type(e).__name__}: {e}"}


# -- scheduling -----------------------------------------------------------------------------------
class Executor:
    """What a backend provides: ``slots`` parallel entries, ``start(id) -> handle``, ``wait(handles, timeout)``."""

    slots = 1

    def start(self, entry_id: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, dict[str, Any]]]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class InlineExecutor(Executor):
    """One worker, this process (the default; the simplest to kill and resume)."""

    def __init__(self, zoo: Path, device: str, threads: int | None, progress: bool, stale_after: float):
        self.args = (str(zoo), device, threads, progress, stale_after)
        self.results: dict[int, dict[str, Any]] = {}
        self.n = 0

    def start(self, entry_id: str) -> int:
        zoo, device, threads, progress, stale_after = self.args
        self.n += 1
        self.results[self.n] = run_entry_safe(zoo, entry_id, device, threads, progress, stale_after)
        return self.n

    def wait(self, handles, timeout):
        return [(h, self.results.pop(h)) for h in handles]


_WORKER: dict[str, Any] = {}


def _init_worker(index_queue, device: str, threads: int, quiet: bool) -> None:
    """Per-process setup: dies with its parent (a killed builder takes its workers along), its own GPU."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
    except OSError:
        pass
    import torch

    from testbed import progress

    progress.set_quiet(quiet)
    index = index_queue.get()
    torch.set_num_threads(threads)
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{index % torch.cuda.device_count()}"
    _WORKER.update(device=device, threads=threads)


def _pool_task(zoo: str, entry_id: str, stale_after: float) -> dict[str, Any]:
    return run_entry_safe(zoo, entry_id, _WORKER["device"], _WORKER["threads"], False, stale_after)


class ProcessExecutor(Executor):
    """``--workers N``: N spawned processes, each with ``torch.set_num_threads(threads)`` (default: cores // N)."""

    def __init__(self, zoo: Path, workers: int, device: str, stale_after: float, quiet: bool, threads: int | None = None):
        import concurrent.futures as cf
        import multiprocessing as mp

        from testbed.device import resolve_device

        if device != "auto":
            device = str(resolve_device(device))
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        for i in range(workers):
            q.put(i)
        threads = threads or max(1, usable_cores() // workers)
        self.slots = workers
        self.zoo, self.stale_after = str(zoo), stale_after
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                           initargs=(q, device, int(threads), quiet))
        self._cf = cf

    def start(self, entry_id: str):
        return self.pool.submit(_pool_task, self.zoo, entry_id, self.stale_after)

    def wait(self, handles, timeout):
        done, _ = self._cf.wait(handles, timeout=timeout, return_when=self._cf.FIRST_COMPLETED)
        out = []
        for h in done:
            try:
                out.append((h, h.result()))
            except Exception as e:  # noqa: BLE001 - a worker process died
                out.append((h, {"status": "failed", "error": f"worker died: {type(e).__name__}: {e}"}))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def schedule(ids: list[str], executor: Executor, report: Callable[[str, dict[str, Any]], None],
             poll: float = POLL_S) -> None:
    """Run every id to completion; entries a live builder elsewhere holds are retried every ``poll`` seconds."""
    queue: deque[str] = deque(ids)
    retry_at: dict[str, float] = {}
    running: dict[Any, str] = {}
    while queue or running:
        now = time.time()
        for _ in range(len(queue)):
            if len(running) >= executor.slots:
                break
            eid = queue.popleft()
            if retry_at.get(eid, 0.0) > now:
                queue.append(eid)
                continue
            running[executor.start(eid)] = eid
        if running:
            for handle, result in executor.wait(list(running), timeout=poll):
                eid = running.pop(handle)
                result.setdefault("id", eid)
                if result.get("status") == "busy":
                    retry_at[eid] = time.time() + poll
                    queue.append(eid)
                else:
                    report(eid, result)
        elif queue:
            time.sleep(max(0.05, min(retry_at.get(q, 0.0) for q in queue) - time.time()))


# -- the whole zoo --------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


def build(spec_path: str | os.PathLike, out: str | os.PathLike, *, workers: int | str = 1, backend: str = "local",
          ray_address: str | None = None, device: str = "auto", stale_after: float = DEFAULT_STALE_AFTER,
          progress: bool = True, quiet: bool = False, say: Callable[[str], None] | None = None,
          threads: int = DEFAULT_THREADS) -> BuildResult:
    """Build (or finish) the zoo ``out`` from ``spec_path``; see docs/zoo.md.

    ``workers``: local processes (``"auto"``: :func:`auto_workers`); ``threads``: torch threads of every entry
    (in every worker, inline or on Ray), fixed so the bytes of an entry do not depend on ``workers``.
    """
    from testbed import progress as progress_mod

    t0 = time.time()
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r} is not known; use local or ray")
    if not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise UserError(f"--threads must be an integer >= 1, got {threads!r}")
    if workers == "auto":
        workers = auto_workers(threads, device)
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise UserError(f"--workers must be an integer >= 1 or auto, got {workers!r}")
    if not (isinstance(stale_after, (int, float)) and math.isfinite(stale_after) and stale_after > 0):
        raise UserError(f"--stale-after must be a positive number of seconds, got {stale_after!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent directory {out.parent} does not exist; create it first")
    spec = parse_spec(spec_path)
    if device != "auto":
        from testbed.device import resolve_device

        resolve_device(device)  # a bad --device fails before any work

    bar = None
    say = say or (lambda msg: (bar.write(msg) if bar is not None else print(msg, flush=True)))
    prepare(spec, out, stale_after, say)
    ids = [e.id for e in spec.entries]
    result = BuildResult()
    for eid in ids:
        if (mf.entry_dir(out, eid) / mf.DONE).is_file():
            _finish_stray(out, eid)
            result.skipped.append(eid)
    todo = [eid for eid in ids if eid not in result.skipped]
    for eid in result.skipped:  # a benign entry built before attacks were added to the grid: score it on them
        scored = refresh_references(out, eid, device, threads, stale_after)
        if scored:
            say(f"{eid}: benign reference scores added for {', '.join(scored)}")
    bar = progress_mod.bar(total=len(ids), desc="zoo", initial=len(result.skipped)) if progress else None
    if result.skipped:
        say(f"{len(result.skipped)}/{len(ids)} entries already built; {len(todo)} to go")

    def report(eid: str, res: dict[str, Any]) -> None:
        if res.get("status") == "done":
            result.done.append(eid)
            m = res.get("metrics") or mf.read_json(mf.entry_dir(out, eid) / mf.DONE).get("metrics") or {}
            extra = "" if not res.get("already") else " (built by another builder)"
            say(f"[{len(result.done) + len(result.skipped)}/{len(ids)}] {eid}: mIoU-B {_fmt(m.get('mIoU-B'))}  "
                f"ASR {_fmt(m.get('ASR'))}  {res.get('seconds', 0):.0f}s{extra}")
        else:
            result.failed[eid] = res.get("error", "unknown error")
            say(f"[failed] {eid}: {result.failed[eid]}")
        if bar is not None:
            bar.update(1)

    if todo:
        if backend == "ray":
            from testbed.zoo.ray_backend import RayExecutor

            executor: Executor = RayExecutor(out, ray_address, device, stale_after, cpus_per_task=threads)
        elif workers == 1:
            executor = InlineExecutor(out, device, threads, progress and not quiet, stale_after)
        else:
            executor = ProcessExecutor(out, workers, device, stale_after, quiet or not progress_mod.enabled(), threads)
        try:
            schedule(todo, executor, report)
        finally:
            executor.close()
    if bar is not None:
        bar.close()
    manifest = mf.write_manifest(out)
    result.seconds = time.time() - t0
    n_done = manifest["counts"]["done"]
    say(f"zoo {out}: {n_done}/{len(manifest['entries'])} entries built "
        f"({len(result.done)} now, {len(result.skipped)} before) in {result.seconds:.0f}s; manifest: {out / mf.MANIFEST}")
    return result
