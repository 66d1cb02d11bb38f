"""One zoo entry's work: train and score it under its claim, seal it with ``done.json``, rescore references.

Why apart from :mod:`testbed.zoo.build`: this is what every worker runs (inline, in a spawned process, as a Ray
task), so it must be importable alone; the build only plans datasets and hands entry ids to executors.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from testbed.core import atomic
from testbed.core.device import resolve_device, torch_threads
from testbed.core.errors import UserError
from testbed.core.jsonutil import jsonable
from testbed.execution.claims import DEFAULT_STALE_AFTER, Claim, me, zoo_lock
from testbed.scoring.scorer import score_model
from testbed.training.loop import TrainConfig, train
from testbed.training.runs import load_run
from testbed.zoo import manifest as mf


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _append_log(path: Path, record: dict[str, Any]) -> None:
    old = path.read_text() if path.is_file() else ""
    atomic.write_text(path, old + json.dumps(record) + "\n")


def _epochs_done(run_dir: Path) -> int:
    log = run_dir / "train_log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0


def finish_stray(zoo: Path, entry_id: str) -> None:
    """A builder killed right after done.json leaves the checkpoint behind; it is not part of the zoo."""
    (mf.entry_dir(zoo, entry_id) / "checkpoint.pt").unlink(missing_ok=True)


def _entry_files(edir: Path) -> dict[str, str]:
    """The hashes done.json records: every file of a finished entry but done.json itself and the checkpoint."""
    return {p.name: mf.file_sha256(p) for p in sorted(edir.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in (mf.DONE, "checkpoint.pt")}


def _score_references(zoo: Path, edir: Path, wanted: dict[str, str], dev: Any, batch_size: int) -> tuple[dict, dict]:
    """A benign entry scored on each attack's test set (the paper's "Benign" rows), nothing written.

    ``wanted`` maps attack ids to dataset names; scores already in reference.json are kept, so a resumed build
    only scores the attacks added to the grid since.  Returns (the full scores for reference.json, their summaries).
    """
    if not wanted:
        return {}, {}
    full = mf.read_json(edir / mf.REFERENCE) or {}
    missing = {label: name for label, name in wanted.items() if label not in full}
    if missing:
        model, _ = load_run(edir, dev)
        full.update({label: score_model(model, mf.dataset_file(zoo, name), dev, batch_size=max(32, batch_size))
                     for label, name in missing.items()})
    return full, {label: mf.summary(full[label]) for label in wanted}


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
    zoo = Path(zoo)
    edir = mf.entry_dir(zoo, entry_id)
    claim = Claim(mf.entry_claim(zoo, entry_id), zoo, stale_after)
    if not stale_references(zoo, entry_id) or not claim.acquire():
        return []
    try:
        missing = stale_references(zoo, entry_id)
        if not missing:  # another builder refreshed it meanwhile
            return []
        _refuse_changed(zoo, entry_id)
        row = mf.load_plan(zoo)["entries"][entry_id]
        batch = int(row["definition"]["train"].get("batch_size", 8))
        with torch_threads(threads):
            full, summaries = _score_references(zoo, edir, row["reference"], resolve_device(device), batch)
        with zoo_lock(zoo):  # the files, done.json and the manifest change together: no builder sees them half-way
            _refuse_changed(zoo, entry_id)  # again: nothing may have changed while it scored
            done = mf.read_json(edir / mf.DONE)
            atomic.write_json(edir / mf.REFERENCE, jsonable(full))
            done["reference"] = summaries
            done["files"] = {**done["files"], mf.REFERENCE: mf.file_sha256(edir / mf.REFERENCE)}  # nothing else re-hashed
            done["rescored"] = [*(done.get("rescored") or []), {"scored": missing, "time": now(), **me()}]
            atomic.write_json(edir / mf.DONE, jsonable(done))
            mf.write_manifest(zoo, rescored={entry_id}, locked=True)
    finally:
        claim.release()
    return missing


def _refuse_changed(zoo: Path, entry_id: str) -> None:
    """Never re-seal a tampered entry with fresh hashes: its files must match the manifest before a rescore."""
    problems = mf.entry_file_problems(zoo, entry_id)
    if problems:
        raise UserError(f"entry {entry_id}: {problems[0]}; not rescoring it: run `testbed zoo verify {zoo}`")


def build_entry(zoo: str | os.PathLike, entry_id: str, device: str = "auto", threads: int | None = None,
                progress: bool = False, stale_after: float = DEFAULT_STALE_AFTER) -> dict[str, Any]:
    """Train and score one entry unless it is finished or a live builder holds it.

    Returns ``{"id", "status": "done"|"busy", ...}``; errors propagate (the scheduler records them).
    """
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
    t0, cpu0 = time.time(), time.process_time()
    with torch_threads(threads):  # the bytes depend on it: see DEFAULT_THREADS
        try:
            if (edir / mf.DONE).is_file():
                return {"id": entry_id, "status": "done", "already": True}
            dev = resolve_device(device)
            edir.mkdir(parents=True, exist_ok=True)
            existing = mf.read_json(edir / mf.ENTRY_DEF)
            if existing is None:
                atomic.write_json(edir / mf.ENTRY_DEF, d)
            elif existing != d:
                raise UserError(f"{edir}/{mf.ENTRY_DEF} describes other settings than plan.json; the zoo is inconsistent, use a new --out")
            resume = (edir / "checkpoint.pt").is_file()
            _append_log(edir / mf.ZOO_LOG, {"event": "start", "resume": resume, "from_epoch": _epochs_done(edir) if resume else 0,
                                            "threads": torch.get_num_threads(), "time": now(), **me()})

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
            full, reference = _score_references(zoo, edir, row.get("reference") or {}, dev, cfg.batch_size)
            if full:
                atomic.write_json(edir / mf.REFERENCE, jsonable(full))
            spent = {"seconds": round(time.time() - t0, 3), "cpu_seconds": round(time.process_time() - cpu0, 3)}
            _append_log(edir / mf.ZOO_LOG, {"event": "finish", "time": now(), **spent, **me()})
            done = {"id": entry_id, "metrics": mf.summary(metrics), "reference": reference or None,
                    "files": _entry_files(edir), "finished": now(), **spent, "builder": me()}
            atomic.write_json(edir / mf.DONE, jsonable(done))
            finish_stray(zoo, entry_id)
        finally:
            claim.release()
    mf.write_manifest(zoo)
    return {"id": entry_id, "status": "done", "metrics": mf.summary(metrics), "seconds": round(time.time() - t0, 1)}


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


def ray_entry_task(zoo: str, entry_id: str, device: str, cpus: int, stale_after: float) -> dict[str, Any]:
    """:func:`run_entry_safe` as a Ray task (:class:`testbed.execution.ray_backend.RayExecutor`): ``device="auto"``
    is the task's GPU when Ray gave it one; the result names the node."""
    import ray

    if device == "auto":
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
    result = run_entry_safe(zoo, entry_id, device, cpus, False, stale_after)
    result["node"] = os.uname().nodename
    return result
