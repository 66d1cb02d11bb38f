"""Benchmarking defenses: every defense on every model, one report (the library behind `testbed bench`/`defend`).

Each model × defense pair goes through :func:`testbed.evaluation.runner.run_defense`, so a built-in and an
outside defense are scored identically; a defense that fails on one model is recorded and the others still
run.  Pairs are written one by one into the report directory (:mod:`testbed.bench.store`): a killed bench
resumes where it stopped, and a bench into an existing report merges its rows (same model × defense replaced,
the others kept) before the report is regenerated from all of them.  Pairs run in this process or in
parallel (:mod:`testbed.bench.workers`).  Rows of a zoo bench also carry the entry's ``seed``, its ``group``
(grid point without the seed) and the poisoned file's ``attack_params``, which statistics over seeds group by.

What a bench is told comes as objects (:mod:`testbed.bench.settings`)::

    run_bench(out, defenses, ModelSource(zoo="zoo/"), BenchSettings(seed=1), params={...},
              execution=Execution(workers=2), report=ReportOptions(title="..."))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import testbed.zoo
from testbed.zoo import benign_floors
from testbed.zoo.integrity import cached_sha256
from testbed.bench.settings import BenchModel, BenchSettings, Execution, ModelSource, ReportOptions
from testbed.bench.report import write_report
from testbed.bench.store import ReportStore, pair_id, read_pair, same_key
from testbed.bench.workers import PairJob, default_threads, make_executor, say_result
from testbed.core.device import machine, resolve_device
from testbed.core.errors import UserError
from testbed.core.guards import check_outputs
from testbed.core.jsonutil import jsonable
from testbed.core.paramtypes import is_int, is_num
from testbed.data.h5data import open_dataset
from testbed.defenses.registry import load_defense
from testbed.evaluation.attack_check import check_min_asr
from testbed.execution.executors import schedule
from testbed.stats.rows import read_report
from testbed.training.provenance import other_data_note
from testbed.training.runs import check_weights, load_config

__all__ = ["BenchModel", "BenchSettings", "Execution", "ModelSource", "ReportOptions", "check_budgets", "run_bench",
           "split_names", "zoo_models"]


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
    """The finished entries of a zoo (those whose id matches the glob ``entries``, or one of its comma-separated
    globs) as models to defend, each attacked one with its benign floor (:func:`benign_floors`, from every entry of
    the zoo)."""
    every = list(testbed.zoo.open(zoo_path))
    floors = benign_floors(every)
    out = [BenchModel(e.id, Path(e.run_dir), Path(e.data_path), e.attack_id, bool(e.is_benign), int(e.seed), e.group,
                      True, floors.get(e.id))
           for e in every if entries is None or any(fnmatch.fnmatchcase(e.id, g.strip()) for g in entries.split(","))]
    if not out:
        what = f" matching {entries!r}" if entries else ""
        raise UserError(f"zoo {zoo_path} has no finished entries{what}; build it with `testbed zoo build` or change --entries")
    return out


def check_budgets(budget_s: Any, budget_passes: Any) -> None:
    """``budget_s`` positive seconds, ``budget_passes`` a positive integer (or None; numpy numbers count, bools do
    not); one line naming the flag."""
    if budget_s is not None and not (is_num(budget_s) and budget_s > 0):
        raise UserError(f"--budget must be a positive number of seconds, got {budget_s!r}")
    if budget_passes is not None and not is_int(budget_passes, 1):
        raise UserError(f"--budget-passes must be a positive whole number of forward + backward passes, got {budget_passes!r}")


def _check_execution(execution: Execution) -> None:
    workers, backend = execution.workers, execution.backend
    if not is_int(workers, 1):
        raise UserError(f"--workers must be a whole number of at least 1, got {workers!r}")
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r} is not known; use local or ray")


def _check_args(defenses: str | Sequence[Any], params: dict[str, dict[str, Any]],
                settings: BenchSettings) -> tuple[list[Any], list[Any]]:
    """The defense specs and their loaded defenses (each loaded once, so a bad name or parameter fails up front)."""
    check_budgets(settings.budget_s, settings.budget_passes)
    check_min_asr(settings.min_asr, "--min-asr")
    if settings.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.threads < 1:
        raise UserError(f"--threads must be at least 1, got {settings.threads}")
    specs = split_names(defenses)
    unknown = sorted(set(params) - {s for s in specs if isinstance(s, str)})
    if unknown:
        raise UserError(f"parameters given for {', '.join(unknown)}, which is not among the defenses; check --param names")
    loaded = [load_defense(s, **params.get(s, {})) if isinstance(s, str) else load_defense(s) for s in specs]
    names = [d.name for d in loaded]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two of the --defense entries are both named {dup[0]!r}; a report holds one row per model and "
                        "defense name, so run them into separate reports")
    return specs, loaded


def _models(source: ModelSource) -> list[BenchModel]:
    if source.models is not None:
        return list(source.models)
    if source.zoo is not None:
        return zoo_models(source.zoo, source.entries)
    if source.run is not None:
        if source.data is None:
            raise UserError("--run needs --data POISONED.h5 (the dataset the model was trained on)")
        return [BenchModel(Path(source.run).name or "model", Path(source.run), Path(source.data))]
    raise UserError("name the models to defend: --zoo ZOO/ or --run RUN/ --data D.h5")


def _check_inputs(out: Path, models: list[BenchModel], zoo: Any) -> None:
    """--out may not be, or hold, what the bench reads (a run, a data file, the zoo)."""
    inputs: list[tuple[str, Any]] = [("--zoo", zoo)]
    for m in models:
        inputs += [("the run", m.run_dir), ("the data", m.data_path)] if zoo is not None else \
            [("--run", m.run_dir), ("--data", m.data_path)]
    check_outputs([("--out", out)], inputs)


def _preflight(models: list[BenchModel]) -> dict[str, list[str]]:
    """Refuse a model whose weights are not safetensors or whose classes differ from its data's (before any work);
    the note for one scored on a file it was not trained on (the run's config records the training file's content hash), per model id."""
    notes: dict[str, list[str]] = {}
    for m in models:
        config = load_config(m.run_dir)
        check_weights(Path(m.run_dir) / "model.safetensors")  # a forged or broken file fails before --out is touched
        with open_dataset(m.data_path, check_labels=False) as f:
            classes = list(f.classes)
        if config.get("classes") is not None and list(config["classes"]) != classes:
            raise UserError(f"{m.run_dir} was trained on {len(config['classes'])} classes ({', '.join(config['classes'][:4])}, "
                            f"...) but {m.data_path} has {len(classes)} ({', '.join(classes[:4])}, ...); defend it with "
                            "data of the same classes")
        note = None if m.trained_on_data else other_data_note(m.run_dir, config, m.data_path)
        notes[m.id] = [note.removeprefix("note: ")] if note else []
    return notes


def _plan(out: Path, models: list[BenchModel], specs: list[Any], loaded: list[Any], params: dict[str, dict[str, Any]],
          settings: BenchSettings, notes: dict[str, list[str]]) -> tuple[dict[str, PairJob], dict[str, Any]]:
    """One job per model × defense (pair id → job) and the defense objects handed over in this process
    (``loaded``: the specs' defenses, loaded once, for their names and revisions)."""
    jobs, objects = {}, {}
    names, revisions = [d.name for d in loaded], [_revision(d) for d in loaded]
    for m in models:
        model = {"id": m.id, "run_dir": str(m.run_dir), "data_path": str(m.data_path), "attack": m.attack,
                 "is_benign": m.is_benign, "seed": m.seed, "group": m.group,
                 "weights_sha256": cached_sha256(Path(m.run_dir) / "model.safetensors")}  # which model, across machines
        # (cached: opening a zoo has already hashed its entries' weights in this process)
        if m.benign_floor is not None:  # only a zoo's attacked entries have one
            model["benign_floor"] = m.benign_floor
        for spec, name, revision in zip(specs, names, revisions):
            pid = pair_id(m.id, name)
            p = params.get(spec, {}) if isinstance(spec, str) else {}
            spec_name = spec if isinstance(spec, str) else None
            typed = spec_name or f"{type(spec).__module__}:{type(spec).__qualname__}"
            setting = {**dataclasses.asdict(settings), "params": p, "defense": typed}  # as typed: `compare` accepts it too
            key = {"model": model, "defense": typed, "name": name, "settings": setting}
            if revision is not None:  # a defense whose results changed says so; its older pairs then rerun
                key["revision"] = revision
            key = jsonable(key)
            jobs[pid] = PairJob(out=str(out), pid=pid, model=jsonable(model), defense=spec_name, name=name,
                                params=jsonable(p), settings=jsonable(setting), key=key, notes=list(notes.get(m.id, [])))
            if spec_name is None:
                objects[pid] = spec
    return jobs, objects


def _revision(defense: Any) -> Any:
    """The defense class's ``revision`` attribute (None when it has none): bumped by a defense's author when its
    results change under the same parameters, so a report's pairs from the older code are replaced, not mixed in."""
    return getattr(type(defense), "revision", None)


@dataclasses.dataclass
class _Bench:
    """One bench under way: its report, the resolved settings, its jobs and how they run."""

    store: ReportStore
    settings: BenchSettings
    execution: Execution
    report: ReportOptions
    jobs: dict[str, PairJob]
    objects: dict[str, Any]
    say: Callable[[str], None]


def _run_pairs(bench: _Bench, todo: list[str]) -> list[dict[str, Any]]:
    """Run the ``todo`` pairs; returns the failures that left no row (a pair that could not run at all)."""
    failed: list[dict[str, Any]] = []
    if not todo:
        return failed
    for pid in todo:
        bench.jobs[pid].write()
    executor = make_executor(bench.store.out, bench.execution, bench.settings, bench.jobs, bench.objects)
    start, count = time.perf_counter(), [0]

    def report(pid: str, result: dict[str, Any]) -> None:
        count[0] += 1  # one line per pair, numbered, with the bench's wall time so far (scoring included)
        say_result(result, bench.execution.debug,
                   lambda line: bench.say(f"[{count[0]}/{len(todo)}, {time.perf_counter() - start:.1f} s "
                                          f"elapsed] {line}" if not line.startswith("  ") else line))
        if result.get("status") != "done":
            failed.append(result)

    try:
        schedule(todo, executor, report)
    finally:
        executor.close()
    return failed


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _from_keywords(models: Any, keywords: dict[str, Any]) -> tuple[ModelSource, BenchSettings, Execution,
                                                                    ReportOptions]:
    """The objects behind the earlier keyword call ``run_bench(out, defenses, zoo=..., device=..., seed=...,
    workers=..., title=..., params=...)``: each keyword goes to the object that holds a field of its name."""
    kinds = (ModelSource, BenchSettings, Execution, ReportOptions)
    given = [{} for _ in kinds]
    for key, value in keywords.items():
        slot = next((i for i, k in enumerate(kinds) if key in {f.name for f in dataclasses.fields(k)}), None)
        if slot is None:
            raise TypeError(f"run_bench() got an unexpected keyword argument {key!r}")
        given[slot][key] = value
    if isinstance(models, ModelSource):  # a source given as an object: the keywords may not name another
        if given[0]:
            raise TypeError(f"run_bench(): {sorted(given[0])[0]}= given beside a ModelSource; put it in the ModelSource")
        source = models
    else:
        source = kinds[0](**given[0], **({} if models is None else {"models": models}))
    return source, kinds[1](**given[1]), kinds[2](**given[2]), kinds[3](**given[3])


def run_bench(out: str | os.PathLike, defenses: str | Sequence[Any],
              models: ModelSource | Sequence[BenchModel] | None = None, settings: BenchSettings | None = None, *,
              params: dict[str, dict[str, Any]] | None = None, execution: Execution | None = None,
              report: ReportOptions | None = None, **keywords: Any) -> dict[str, Any]:
    """Run every defense on every model and write the report into ``out``; returns the results.json content
    plus ``"errors"`` (failed runs), ``"defense_errors"`` (runs the defense failed) and ``"testbed_errors"``
    (runs and figures the testbed itself failed).

    ``models``: a :class:`ModelSource` (a zoo, or a run with its data) or a list of :class:`BenchModel`.
    ``defenses``: comma-separated names or a list of names/defense objects; ``params``: defense name →
    parameters.  ``settings`` (:class:`BenchSettings`) is recorded in every row; ``min_asr``: a backdoored
    model whose ASR before any defense is below it gets DER n/a.  ``execution``: workers, backend, threads (see
    :mod:`testbed.bench.workers`).  ``report``: an existing report in ``out`` is merged into (``overwrite``
    discards it first); an interrupted bench with the same arguments is resumed, and pairs the report already
    holds with the same settings are not run again (``rerun`` runs them again; with all of them finished the
    bench does nothing).  The earlier keyword call (``zoo=``, ``run=``, ``data=``, ``device=``, ``seed=``,
    ``workers=``, ``title=``, ...) still works: each keyword fills the field of the same name.
    """
    if keywords:
        if settings is not None or execution is not None or report is not None:
            raise TypeError("run_bench(): pass settings, execution and report as objects or all as keywords, not both")
        models, settings, execution, report = _from_keywords(models, keywords)
    source = models if isinstance(models, ModelSource) else ModelSource(models=models)
    execution, report = execution or Execution(), report or ReportOptions()
    params = dict(params or {})
    _check_execution(execution)
    settings = dataclasses.replace(settings or BenchSettings())
    settings.seed, settings.save_model = int(settings.seed), bool(settings.save_model)
    if settings.threads is None:
        settings.threads = default_threads(execution.workers, execution.backend)
    specs, loaded = _check_args(defenses, params, settings)
    names = [d.name for d in loaded]
    listed = _models(source)
    _check_inputs(Path(out), listed, source.zoo)
    store = ReportStore(out)
    store.check(report.overwrite)
    if execution.backend != "ray":  # one device for every pair; a Ray task picks its own GPU when "auto"
        settings.device = str(resolve_device(settings.device))
    say = execution.log or _stderr
    notes = _preflight(listed)
    for m in listed:
        for note in notes[m.id]:
            say(f"note: {note}")
    jobs, objects = _plan(store.out, listed, specs, loaded, params, settings, notes)
    bench = _Bench(store, settings, execution, report, jobs, objects, say)
    return _run_locked(bench, {"names": names, "models": listed, "source": source, "started": time.perf_counter()})


def _run_locked(bench: _Bench, what: dict[str, Any]) -> dict[str, Any]:
    """Lock the report, run the pairs it lacks, commit them and regenerate the report from every pair."""
    store, out = bench.store, bench.store.out
    store.lock()
    try:
        plan, done, same = _begin(store, bench.jobs, (bench.report.overwrite, bench.report.rerun), out, bench.say)
        if len(same) == len(plan) and (out / "results.json").is_file():  # nothing to run: the report stands as is
            store.commit(plan)
            return {**_add_error_counts(read_report(out), []), "nothing_to_do": True}
        failed = _run_pairs(bench, [p for p in bench.jobs if p not in done | same])
        store.commit(plan)
        doc = _write(bench, list(bench.jobs), what)
    finally:
        store.unlock()
    return _add_error_counts(doc, failed)


def _already_in_report(store: Any, plan: dict[str, dict[str, Any]], done: set[str], rerun: bool,
                       say: Callable[[str], None]) -> set[str]:
    """The pairs the report already holds with the same key (not run again unless ``rerun``), saying so; and a
    line naming each finished pair this bench replaces because it runs with other settings."""
    same, replaced = set(), []
    for pid, key in plan.items():
        old = None if pid in done else read_pair(store.pairs, pid)
        if old is None:
            continue
        if same_key(old.key, key) and not rerun:
            same.add(pid)
        elif not same_key(old.key, key):
            replaced.append(f"{key['name']} on {key['model']['id']} ({_key_change(old.key, key)})")
    if replaced:
        say(f"replacing {len(replaced)} finished pair(s) run with other settings: " + "; ".join(replaced))
    if same and len(same) + len(done) == len(plan):
        say(f"{len(same) + len(done)} of {len(plan)} pairs already finished in {store.out}; nothing to do "
            "(--rerun runs them again)")
    elif same:
        say(f"{len(same)} of {len(plan)} pairs already finished in {store.out} with the same settings; "
            f"running the other {len(plan) - len(same) - len(done)} (--rerun runs all)")
    return same


def _key_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two pair keys, as ``params {'sigma': 1} → {'sigma': 0.5}, seed 0 → 1``."""
    a, b = dict(old.get("settings") or {}), dict(new.get("settings") or {})
    diffs = [f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    floors = [(k.get("model") or {}).get("benign_floor") for k in (old, new)]
    if floors[0] != floors[1]:
        diffs.append(f"the benign floor {floors[0]!r} → {floors[1]!r}")
    if old.get("revision") != new.get("revision"):
        diffs.append(f"the defense's revision {old.get('revision')!r} → {new.get('revision')!r}")
    if {**(old.get("model") or {}), "benign_floor": None} != {**(new.get("model") or {}), "benign_floor": None}:
        diffs.append("the model's files")
    return ", ".join(diffs) or "another defense class"


def _begin(store: Any, jobs: dict[str, Any], flags: tuple[bool, bool], out: Path,
           say: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], set[str], set[str]]:
    """Start (or resume) the locked report: the plan of pair keys, the pairs an interrupted run of it finished,
    and the pairs the report already holds with the same settings (``flags``: overwrite, rerun)."""
    overwrite, rerun = flags
    if overwrite:
        store.clear()
    plan = {pid: job.key for pid, job in jobs.items()}
    done, merged = store.begin(plan)
    if merged:
        say(f"note: {len(merged)} finished pair(s) of an interrupted bench with other settings were kept in {out}")
    if done:
        say(f"resuming: {len(done)} of {len(plan)} pair(s) already finished in {out}")
    return plan, done, _already_in_report(store, plan, done, rerun, say)


def _add_error_counts(doc: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts the CLI's exit status and summary read: failed runs, by whose fault, and unrun pairs."""
    rows = doc["rows"]
    doc["errors"] = sum(1 for r in rows if r.get("error"))
    doc["defense_errors"] = sum(1 for r in rows if r.get("error") and r.get("error_source") == "defense")
    doc["testbed_errors"] = (sum(1 for r in rows if r.get("error") and r.get("error_source") == "testbed")
                             + len(doc.get("figure_errors", [])) + len(failed))
    doc["pair_failures"] = failed
    return doc


def _current_revisions(pairs: list[Any], jobs: dict[str, Any], this: set[str]) -> tuple[list[Any], list[str]]:
    """The pairs a report is made of: those of this bench, and earlier ones (other models) unless their defense
    runs at another revision in this bench — old and new results of one defense are never mixed in a table.
    Returns (pairs kept, ids of pairs left out; their files stay in ``pairs/``)."""
    current = {job.name: job.key.get("revision") for job in jobs.values()}
    kept, older = [], []
    for p in pairs:
        pid, name = pair_id(p.row.model, p.row.defense), p.key.get("name")
        if pid not in this and name in current and p.key.get("revision") != current[name]:
            older.append(pid)
        else:
            kept.append(p)
    return kept, older


def _write(bench: _Bench, order: list[str], what: dict[str, Any]) -> dict[str, Any]:
    """The report regenerated from every finished pair of ``out`` (``what``: this bench's defense names, models,
    model source and start time)."""
    store, settings, source = bench.store, bench.settings, what["source"]
    pairs, older = _current_revisions(store.all_pairs(order), bench.jobs, set(order))
    if older:
        bench.say(f"left out of the report: {len(older)} pair(s) of other models computed by an older revision of "
                  f"their defense ({', '.join(older[:3])}{', ...' if len(older) > 3 else ''}); a bench over those "
                  "models (--entries) reruns them")
    rows = [p.row for p in pairs]
    classes = {p.row.model: p.classes for p in pairs}
    this = set(order)
    kept = sum(1 for r in rows if pair_id(r.model, r.defense) not in this)
    meta = {
        "title": bench.report.title, "zoo": str(source.zoo) if source.zoo is not None else None,
        "data": str(source.data) if source.data is not None else None,
        "device": settings.device, "seed": settings.seed, "budget_s": settings.budget_s,
        "budget_passes": settings.budget_passes, "threads": settings.threads, "min_asr": settings.min_asr,
        "defenses": list(dict.fromkeys(r.defense for r in rows)), "models": list(dict.fromkeys(r.model for r in rows)),
        "this_run": {"defenses": what["names"], "models": [m.id for m in what["models"]]}, "rows_from_earlier_runs": kept,
        "left_out_older_revision": older,
        "command_seconds": round(time.perf_counter() - what["started"], 1),  # pairs run + scoring, before figures
        "machine": machine(settings.device),  # where this run's rows ran (rows kept from earlier runs say nothing of theirs)
    }
    return write_report(store.out, rows, meta=meta, classes=classes, figures=bench.report.figures)
