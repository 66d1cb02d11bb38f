"""`testbed demo`: the whole pipeline on synthetic data, shaped like the paper's Tables 1–2.

synth data → benign, BadNets and FGBA (N-to-1, 1-to-1; line and semantic triggers) poisoned sets →
a tiny model trained on each → scores → built-in defenses on one attacked model → report.md,
results.json and figures.

Why through the zoo: the seven models are a zoo (one model × seven attack settings × one seed), so the demo
writes that zoo's spec (``OUT/work/zoo.toml``, rerunnable with `testbed zoo build`) and lets
:func:`testbed.zoo.build.build` do the work — one copy of the pipeline: datasets built once, entries trained
by ``workers`` processes at a fixed ``threads`` each (independent models on 2 cores train ~1.8× faster side by
side than one after the other, BENCHMARKS.md P8), the benign model scored against every attacked test set
(the paper's "Benign" rows), and a rerun after a crash or Ctrl-C picks up where it stopped.  The defenses run
through :func:`testbed.bench.run.run_bench`, which resumes the same way.  Same seed and threads ⇒ the same numbers
on the same machine and library versions, however many workers ran.

This module orchestrates; what is trained and checked is in :mod:`testbed.demo.settings`, report.md is written by
:mod:`testbed.demo.report`, the figures by :mod:`testbed.demo.figures`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testbed.zoo
from testbed.bench.run import run_bench
from testbed.core import atomic
from testbed.core.device import resolve_device, torch_threads
from testbed.core.errors import UserError
from testbed.core.paramtypes import is_int
from testbed.data.h5data import open_dataset
from testbed.demo.report import check_targets, render_report
from testbed.demo.settings import (ALL_KEYS, BENIGN, DEFAULT_DEFENSES, LAYOUT, SETTINGS, DemoConfig,  # noqa: F401
                                  check_settings, zoo_spec)  # DEFAULT_DEFENSES: re-exported (its earlier path)
from testbed.demo.figures import figures
from testbed.scoring.scorer import SCORE_KEYS
from testbed.zoo import manifest as mf
from testbed.zoo.build import auto_workers, build

__all__ = ["Model", "attack_rows", "run_demo"]


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _identity(cfg: DemoConfig) -> dict:
    """What the cached work/ depends on: a rerun with other settings (or on another kind of device) must not reuse it."""
    return {"layout": LAYOUT, "n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, "threads": cfg.threads,
            "device": resolve_device(cfg.device).type, "train": dict(cfg.train_overrides)}


def _prepare_work(out: Path, cfg: DemoConfig) -> Path:
    """``OUT/work/`` checked against the settings it was made with (refused if they differ), and created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    work = out / "work"
    identity = _identity(cfg)
    if (work / "settings.json").exists():
        before = json.loads((work / "settings.json").read_text())
        if before != identity:
            changed = ", ".join(f"{k} {before.get(k)!r} → {v!r}" for k, v in identity.items() if before.get(k) != v)
            raise UserError(f"{out} holds a demo made with other settings ({changed}); use another --out or delete it")
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_json(work / "settings.json", identity)
    return work


@dataclass
class Model:
    """One trained demo model: its run directory, the dataset it was trained on, and its scores."""

    run: Path
    data: Path
    metrics: dict
    reference: dict  # benign model: attack id → its scores on that attack's test set


def _entry_id(cfg: DemoConfig, name: str) -> str:
    return f"{cfg.model}--{name}--s{cfg.seed}"


def _models(zoo: Path) -> dict[str, Model]:
    """The finished zoo as name (``benign`` or a setting name) → Model (entries verified against the manifest)."""
    models = {}
    for e in testbed.zoo.open(zoo):
        ref = json.loads((e.run_dir / "reference.json").read_text()) if e.is_benign else {}
        models[e.attack_id] = Model(e.run_dir, e.data_path, json.loads((e.run_dir / "metrics.json").read_text()), ref)
    return models


def _defend(out: Path, cfg: DemoConfig, zoo: Path, device: Any, workers: int = 1) -> list[dict]:
    """The defenses on the defended model: with ``workers`` > 1 in that many processes (each pair with
    ``cfg.threads`` threads, so the numbers are the same as one after the other in this process)."""
    eid = _entry_id(cfg, cfg.defend_setting)
    data = mf.dataset_file(zoo, mf.load_plan(zoo)["entries"][eid]["data"])
    _log(f"defenses {', '.join(cfg.defenses)} on the {cfg.defend_setting} model")
    return run_bench(out / "defenses", list(cfg.defenses), run=mf.entry_dir(zoo, eid), data=data, device=str(device),
                     seed=cfg.seed, budget_s=cfg.budget_s, budget_passes=cfg.budget_passes, title="Defenses in the demo",
                     params=cfg.params, workers=max(1, min(workers, len(cfg.defenses))),
                     threads=cfg.threads, log=lambda m: _log(f"  {m}"))["rows"]


def _slot_for_defenses(zoo: Path, cfg: DemoConfig, workers: int) -> bool:
    """The defended model is finished and fewer models than workers are left to train: a core is idle."""
    ids = [_entry_id(cfg, n) for n in [BENIGN] + [s.name for s in SETTINGS]]
    left = [i for i in ids if not (mf.entry_dir(zoo, i) / mf.DONE).is_file()]
    return _entry_id(cfg, cfg.defend_setting) not in left and len(left) < workers


def _build_and_defend(out: Path, work: Path, cfg: DemoConfig, workers: int, device: Any) -> tuple[dict[str, Model], list[dict]]:
    """Train (or reuse) the seven models through the zoo and run the defenses on one of them.

    The zoo build runs in a thread (its entries train in ``workers`` processes); the defenses start in this
    process once their model (the first in the spec) is finished and fewer models than workers are left to
    train: 7 models on 2 workers leave a core idle while the last one trains, and the default defenses fit in
    that time.  Started earlier, as a third process on 2 cores, they would slow every model down and leave the
    last one alone at the end: measured, that is slower unless the defenses cost more than a model (BENCHMARKS.md,
    demo).  Each model and defense has its fixed thread count, so when they run changes no number.  Every step
    is resumable: a rerun after a crash or Ctrl-C reuses finished models and defense results.
    """
    spec, zoo = work / "zoo.toml", work / "zoo"
    atomic.write_text(spec, zoo_spec(cfg))
    _log(f"training {len(SETTINGS) + 1} x {cfg.model} ({cfg.epochs} epochs) with {workers} worker(s) x "
         f"{cfg.threads} thread(s) into {zoo}")
    outcome: dict[str, Any] = {}

    def build_zoo() -> None:
        try:
            outcome["result"] = build(spec, zoo, workers=workers, threads=cfg.threads, device=cfg.device,
                                      say=lambda m: _log(f"  {m}"))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = e

    builder = threading.Thread(target=build_zoo, name="demo-zoo-build", daemon=True)  # dies with a Ctrl-C'd demo
    builder.start()
    rows = None
    while builder.is_alive():
        if rows is None and cfg.defenses and workers > 1 and _slot_for_defenses(zoo, cfg, workers):
            rows = _defend(out, cfg, zoo, device, workers)
        builder.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].failed:
        eid, err = next(iter(outcome["result"].failed.items()))
        raise UserError(f"training failed for {eid}: {err}; fix the cause and run the same command again")
    if rows is None:
        rows = _defend(out, cfg, zoo, device, workers) if cfg.defenses else []
    return _models(zoo), rows


def _scores(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in (*SCORE_KEYS, *ALL_KEYS)}


def attack_rows(models: dict[str, Model], model_name: str) -> list[dict]:
    """results.json "attacks": the benign model on clean data, then on each attacked test set, then each attack."""
    benign = models[BENIGN].metrics
    rows = [{"model": model_name, "attack": "benign", "trigger": None, "rate": 0.0, "reference": None,
             **_scores(benign), "per_class_iou_b": benign.get("per_class_iou_b")}]
    for s in SETTINGS:  # the paper's "Benign" rows: the clean model against each attacked test set
        rows.append({"model": model_name, "attack": "benign", "trigger": s.trigger, "rate": 0.0, "reference": s.attack,
                     **_scores(models[BENIGN].reference[s.name])})
    for s in SETTINGS:
        m = models[s.name]
        with open_dataset(m.data, check_labels=False) as f:
            rate = (f.attack or {}).get("achieved_rate")
        rows.append({"model": model_name, "attack": s.attack, "trigger": s.trigger, "rate": rate, "reference": None,
                     **_scores(m.metrics), "per_class_iou_b": m.metrics.get("per_class_iou_b")})
    return rows


def run_demo(cfg: DemoConfig) -> dict:
    """Run everything; returns the results.json object."""
    t0 = time.time()
    if not is_int(cfg.threads, 1):
        raise UserError(f"threads must be an integer >= 1, got {cfg.threads!r}")
    workers = auto_workers(cfg.threads, cfg.device) if cfg.workers == "auto" else cfg.workers
    if not is_int(workers, 1):
        raise UserError(f"workers must be an integer >= 1 or auto, got {cfg.workers!r}")
    workers = int(workers)
    if cfg.defend_setting not in {s.name for s in SETTINGS}:
        raise UserError(f"defend_setting {cfg.defend_setting!r} is not one of: {', '.join(s.name for s in SETTINGS)}")
    device = resolve_device(cfg.device)
    check_settings(cfg)
    out = Path(cfg.out)
    work = _prepare_work(out, cfg)
    with torch_threads(cfg.threads):  # what this process computes (scores, figures) is fixed too
        models, defense_rows = _build_and_defend(out, work, cfg, workers, device)
        rows = attack_rows(models, cfg.model)
        results = {
            "config": {"n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model,
                       "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device),
                       "threads": cfg.threads, "workers": workers, "defend_setting": cfg.defend_setting,
                       "defenses": list(cfg.defenses), "defense_params": cfg.params,
                       **({"train": cfg.train_overrides} if cfg.train_overrides else {})},
            "attacks": rows,
            "defenses": defense_rows,
            "targets": check_targets(rows),
            "seconds": round(time.time() - t0, 1),
        }
        made = figures(out, {name: (m.run, m.data) for name, m in models.items()}, device)
    atomic.write_json(out / "results.json", results)
    atomic.write_text(out / "report.md", render_report(results, made))
    _log(f"done in {results['seconds']:.0f}s: {out / 'report.md'}")
    return results


