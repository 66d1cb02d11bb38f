"""Building a zoo: data once, each poisoned set once, each entry trained once, resumable after any crash.

Order of work: (1) the clean dataset ``data/clean.h5``; (2) every poisoned dataset the grid needs, named by
its content key (sha256 of the clean data's content hash + the attack's parameters + poisoning seed), so
entries that need the same one share it; (3) the entries, scheduled on inline/process/Ray workers.  Every
unit of work is guarded by a claim (:mod:`testbed.execution.claims`) and finished by an atomic marker (a dataset's
``data/NAME.json``, an entry's ``done.json``), so a killed build is simply run again: finished work is
skipped, an unfinished entry resumes from its last epoch checkpoint, work a live builder holds is waited for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from testbed import attacks
from testbed.core import atomic, progress as progress_mod
from testbed.core.device import resolve_device, usable_cores
from testbed.core.errors import UserError
from testbed.core.guards import check_outputs
from testbed.core.paramtypes import is_int
from testbed.data.h5data import content_hash
from testbed.data.synth import make_synth_dataset
from testbed.execution.claims import DEFAULT_STALE_AFTER, Claim, break_stale, zoo_lock
from testbed.execution.executors import POLL_S, Executor, InlineExecutor, ProcessExecutor, schedule
from testbed.execution.ray_backend import RayExecutor
from testbed.zoo import manifest as mf
from testbed.zoo.attack_table import dry_run
from testbed.zoo.entries import (
    build_entry, finish_stray, now, ray_entry_task, refresh_references, run_entry_safe, stale_references,
)
from testbed.zoo.spec import ZooSpec, parse_spec

__all__ = ["DEFAULT_STALE_AFTER", "DEFAULT_THREADS", "POLL_S", "BuildOptions", "BuildResult", "Executor", "InlineExecutor",
           "ProcessExecutor", "auto_workers", "build", "build_entry", "check_out", "poisoned_name", "prepare",
           "refresh_references", "run_entry_safe", "schedule", "stale_references", "usable_cores"]

# Torch threads per entry unless told otherwise.  CPU results depend on the thread count (a convolution's
# reductions are split per thread), so it is fixed per entry rather than derived from how many entries run
# at once: a zoo built by one worker or by eight gives the same bytes.  One thread per process is also the
# fastest use of a small CPU for tiny models (BENCHMARKS.md, P8).
DEFAULT_THREADS = 1


def auto_workers(threads: int = DEFAULT_THREADS, device: str = "auto") -> int:
    """``--workers auto``: one worker per GPU when entries train on CUDA, else usable cores ÷ threads per worker."""
    if device != "cpu":
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

                    atomic.write_json(record_path, {
                        "name": name, "file": f"data/{name}.h5", "sha256": mf.file_sha256(final),
                        "content_hash": content_hash(final), "bytes": final.stat().st_size,
                        "definition": definition, "built": now(),
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
            make_synth_dataset(tmp, **data["synth"])
        else:
            shutil.copyfile(data["path"], tmp)

    return make


def _make_poisoned(clean: Path, kwargs: dict[str, Any]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
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
    data = check_out(spec, zoo, say)
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
        return _prepare(spec, zoo, data, stale_after, say)
    except BaseException:
        if created and not any(f != ".lock" for _, _, files in os.walk(zoo) for f in files):
            shutil.rmtree(zoo, ignore_errors=True)  # a first build that wrote nothing leaves nothing
        raise


def _prepare(spec: ZooSpec, zoo: Path, data: dict[str, Any], stale_after: float,
             say: Callable[[str], None]) -> dict[str, Any]:
    clean = _ensure_dataset(zoo, "clean", {"source": data}, _make_clean(spec.data), stale_after, say)
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
        plan = _check_plan(zoo, spec, data)
        for eid, row in rows.items():
            old = plan["entries"].get(eid)
            if old is None:
                plan["order"].append(eid)
            elif "reference" in row:  # a spec with part of the grid keeps the attacks the others added
                row["reference"] = {**(old.get("reference") or {}), **row["reference"]}
            plan["entries"][eid] = row
        atomic.write_json(zoo / mf.PLAN, plan)
    mf.write_manifest(zoo)
    return plan


def check_out(spec: ZooSpec, zoo: Path, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Refuse ``zoo`` as --out before anything is written there (see :func:`prepare`).

    Returns the data definition the build records and compares (see :func:`_data_source`).
    """
    if zoo.exists() and not zoo.is_dir():
        raise UserError(f"--out {zoo} is a file; choose a directory")
    outputs = [("--out", zoo / d) for d in ("data", "entries", mf.PLAN, mf.MANIFEST)]
    check_outputs(outputs, {"the spec": spec.path, "[data] path": spec.data.get("path")})
    data = _data_source(zoo, spec, say or (lambda msg: None))
    _check_plan(zoo, spec, data)
    _dry_run_attacks(spec, zoo)
    problems = mf.adoption_problems(zoo) if zoo.is_dir() else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{zoo}: finished work no longer matches the manifest: {problems[0]}{more}; a rebuild would "
                        f"bless it: run `testbed zoo verify {zoo}`, then restore the files or delete the damaged "
                        "entries/ID directory (or data/NAME.*) to rebuild it")
    return data


def _dry_run_attacks(spec: ZooSpec, zoo: Path) -> None:
    """Run every poisoning recipe's checks and selections against the clean data, writing nothing.

    What needs the data (a rate above the candidates, a BadNets target image out of range) fails here, before
    the zoo is created.  The clean data is the zoo's own when it exists, the spec's file, or synthetic scenes
    made in a temporary directory outside the zoo (deterministic: the build makes the same bytes).
    """
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


def _is_path_only(definition: Any) -> bool:
    return isinstance(definition, dict) and set(definition) == {"path"} and isinstance(definition["path"], str)


def _data_source(zoo: Path, spec: ZooSpec, say: Callable[[str], None]) -> dict[str, Any]:
    """The data definition this build compares with the zoo's and records: the spec's, or the zoo's own when
    ``[data] path`` names the zoo's data file moved (another path, the same content hash as ``data/clean.h5``).

    The zoo keeps its original definition (plan.json, data/clean.json and the manifest are not rewritten): the
    zoo's data is its own copy, so the old path is a record of where it came from, and builders that give the old
    path or the new one agree.  Another content at another path is refused, naming both hashes.  Generated data
    and zoos without a clean data record are left to :func:`_check_plan`.
    """
    ours = spec.data_definition()
    plan = mf.load_plan(zoo) if (zoo / mf.PLAN).exists() else None
    if plan is None or plan.get("data") == ours or not (_is_path_only(plan.get("data")) and _is_path_only(ours)):
        return ours
    record = mf.read_json(mf.dataset_record(zoo, "clean"))
    recorded = record.get("content_hash") if isinstance(record, dict) else None
    if not isinstance(recorded, str) or record.get("definition") != {"source": plan["data"]}:
        return ours
    old, new = plan["data"]["path"], ours["path"]
    found = content_hash(new)
    if found != recorded:
        raise UserError(f"{zoo} was built from other data: {old} (content sha256 {recorded[:12]}); [data] path {new} "
                        f"has other content (content sha256 {found[:12]}); use a new --out for this spec")
    say(f"data moved: {old} now at {new}, same content sha256 {found[:12]}; the zoo keeps recording {old}")
    return dict(plan["data"])


def _check_plan(zoo: Path, spec: ZooSpec, data: dict[str, Any]) -> dict[str, Any]:
    plan = mf.load_plan(zoo) if (zoo / mf.PLAN).exists() else None
    if plan is None:
        foreign = _foreign(zoo)
        if foreign:
            raise UserError(f"--out {zoo} holds files but is not a zoo (e.g. {foreign[0].name}); choose an empty or "
                            "new directory")
        return {"format": mf.FORMAT, "version": mf.VERSION, "data": data, "order": [], "entries": {}}
    if plan.get("data") != data:
        raise UserError(f"{zoo} was built from other data ({json.dumps(plan.get('data'))}); use a new --out for this spec")
    for e in spec.entries:
        old = plan["entries"].get(e.id)
        if old is not None and old["definition"] != e.definition():
            raise UserError(f"{zoo}: entry {e.id} exists with other settings than this spec gives it; "
                            "use a new --out (or restore the spec it was built from)")
    return plan



# -- the whole zoo --------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


@dataclass
class BuildOptions:
    """How a zoo is built (``testbed zoo build``'s flags): where its entries run and how.

    ``workers``: local processes (``"auto"``: :func:`auto_workers`); ``threads``: torch threads of every entry
    (in every worker, inline or on Ray), fixed so the bytes of an entry do not depend on ``workers``.
    """

    workers: int | str = 1
    backend: str = "local"
    ray_address: str | None = None
    device: str = "auto"
    stale_after: float = DEFAULT_STALE_AFTER
    progress: bool = True
    quiet: bool = False
    threads: int = DEFAULT_THREADS


def _check_build_args(opts: BuildOptions, out: Path) -> int:
    """Every flag refused before any work; returns the number of local workers (``"auto"`` resolved)."""
    threads, workers, stale_after = opts.threads, opts.workers, opts.stale_after
    if opts.backend not in ("local", "ray"):
        raise UserError(f"--backend {opts.backend!r} is not known; use local or ray")
    if not is_int(threads, 1):
        raise UserError(f"--threads must be an integer >= 1, got {threads!r}")
    if workers == "auto":
        workers = auto_workers(threads, opts.device)
    if not is_int(workers, 1):
        raise UserError(f"--workers must be an integer >= 1 or auto, got {workers!r}")
    threads, workers = int(threads), int(workers)  # a numpy integer from a script is recorded as a plain one
    if not (isinstance(stale_after, (int, float)) and math.isfinite(stale_after) and stale_after > 0):
        raise UserError(f"--stale-after must be a positive number of seconds, got {stale_after!r}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent directory {out.parent} does not exist; create it first")
    return workers


def _make_executor(out: Path, opts: BuildOptions, workers: int) -> Executor:
    if opts.backend == "ray":
        return RayExecutor(out, opts.ray_address, opts.device, opts.stale_after, cpus_per_task=opts.threads,
                           task=ray_entry_task)
    if workers == 1:
        return InlineExecutor(out, opts.device, opts.threads, opts.progress and not opts.quiet, opts.stale_after,
                              run_entry_safe)
    return ProcessExecutor(out, workers, opts.device, opts.stale_after, opts.quiet or not progress_mod.enabled(),
                           opts.threads, task=run_entry_safe)


def _skip_finished(out: Path, ids: list[str], result: BuildResult, device: str, threads: int, stale_after: float,
                   say: Callable[[str], None]) -> list[str]:
    """Entries finished before this build are skipped (benign ones rescored on new attacks); returns the rest."""
    for eid in ids:
        if (mf.entry_dir(out, eid) / mf.DONE).is_file():
            finish_stray(out, eid)
            result.skipped.append(eid)
    todo = [eid for eid in ids if eid not in result.skipped]
    for eid in result.skipped:  # a benign entry built before attacks were added to the grid: score it on them
        scored = refresh_references(out, eid, device, threads, stale_after)
        if scored:
            say(f"{eid}: benign reference scores added for {', '.join(scored)}")
    return todo


def build(spec_path: str | os.PathLike, out: str | os.PathLike, options: BuildOptions | None = None, *,
          say: Callable[[str], None] | None = None, **flags: Any) -> BuildResult:
    """Build (or finish) the zoo ``out`` from ``spec_path``; see docs/zoo.md.

    ``options``: a :class:`BuildOptions`, or its fields as keywords (``build(spec, out, workers=2, threads=1)``).
    """
    if options is not None and flags:
        raise TypeError(f"build() takes options or their fields as keywords, not both (got {sorted(flags)})")
    opts = options or BuildOptions(**flags)
    t0 = time.time()
    out = Path(out)
    workers = _check_build_args(opts, out)
    spec = parse_spec(spec_path)
    if opts.device != "auto":
        resolve_device(opts.device)  # a bad --device fails before any work

    bar = None
    say = say or (lambda msg: (bar.write(msg) if bar is not None else print(msg, flush=True)))
    prepare(spec, out, opts.stale_after, say)
    ids = [e.id for e in spec.entries]
    result = BuildResult()
    todo = _skip_finished(out, ids, result, opts.device, opts.threads, opts.stale_after, say)
    bar = progress_mod.bar(total=len(ids), desc="zoo", initial=len(result.skipped)) if opts.progress else None
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
        executor = _make_executor(out, opts, workers)
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
