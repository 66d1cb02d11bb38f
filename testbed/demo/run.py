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
"""

from __future__ import annotations

import difflib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import testbed.zoo
from testbed import models
from testbed.bench.run import run_bench
from testbed.core import atomic
from testbed.core.device import resolve_device, torch_threads
from testbed.core.errors import UserError
from testbed.data.h5data import open_dataset
from testbed.defenses.registry import load_defense
from testbed.demo.figures import figures
from testbed.scoring.scorer import SCORE_KEYS
from testbed.zoo import manifest as mf
from testbed.zoo.build import auto_workers, build
from testbed.zoo.spec import parse_spec

ALL_KEYS = ("mIoU-B-all", "PA-B-all")  # beside scoring.SCORE_KEYS: the whole clean test set (the paper's Benign rows)
# A repair and an input filter fit the demo's 5 minutes on 2 cores (they run while the last model trains).
# Trigger synthesis (detection) costs about two models' CPU here (~2 min on one core) and the training-set
# defenses retrain a model each: opt in with --defenses, and see docs/results.md for all five over three seeds.
DEFAULT_DEFENSES = ("fine-pruning", "strip")
OPT_IN_NOTE = ("Trigger synthesis (detection; about two minutes of one core on this model) and the training-set "
               "defenses (a retrain each) are not in the default demo, which they would take past 5 minutes on 2 "
               "cores: add them with `testbed demo --defenses fine-pruning,strip,trigger-synthesis`; all five "
               "defenses over three seeds: docs/results.md.")
LAYOUT = 2  # work/ layout: 2 = a zoo under work/zoo (1 was work/data + work/runs)


@dataclass(frozen=True)
class Setting:
    """One poisoned training set of the paper's tables."""

    name: str  # zoo attack id, e.g. "fgba-n-to-1-line"
    attack: str  # results.json "attack": badnets | fgba-n-to-1 | fgba-1-to-1
    trigger: str  # "line" | "semantic:CLASS"
    flags: dict  # attacks.poison_file keyword arguments (mirror `testbed poison` and a zoo [[attack]] table)
    paper_rate: str  # the paper's poisoning rate (or rule) for this setting, for the report


# The paper's setting (§3.1): line trigger, semantic 'wall' for FGBA and 'grass' for BadNets, N-to-1 → wall
# at 10%, 1-to-1 person → palm at ≈20%, BadNets at 10% with a road-scape target; with the semantic trigger the
# fine-grained attacks poison "all samples containing both 'wall' and 'person'" (require = person).
SETTINGS = (
    Setting("badnets-line", "badnets", "line", dict(attack="badnets", trigger="line", rate=0.1),
            "not stated (10% here)"),
    Setting("badnets-semantic", "badnets", "semantic:grass", dict(attack="badnets", trigger="semantic:grass"),
            "≈10% (images with grass)"),
    Setting("fgba-n-to-1-line", "fgba-n-to-1", "line",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1), "10%"),
    Setting("fgba-n-to-1-semantic", "fgba-n-to-1", "semantic:wall",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="semantic:wall", require="person"),
            "10% (images with wall and person)"),
    Setting("fgba-1-to-1-line", "fgba-1-to-1", "line",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="line", rate=0.2), "≈20%"),
    Setting("fgba-1-to-1-semantic", "fgba-1-to-1", "semantic:wall",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="semantic:wall",
                 require="person"), "≈20% (images with wall and person)"),
)
BENIGN = "benign"

# Targets (percent) from the paper's Tables 1–2: (attack, trigger kind) → minimum ASR.
ASR_TARGETS = {("fgba-n-to-1", "line"): 95.0, ("fgba-1-to-1", "line"): 75.0, ("badnets", "line"): 90.0}
BENIGN_MAX_ASR = 15.0
MAX_MIOU_DROP = 2.0


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    n_train: int = 1000
    n_test: int = 200
    size: int = 64
    model: str = "deeplabv3_tiny"
    epochs: int = 11
    batch_size: int = 8  # more steps per epoch than 16 at the same cost on 1 thread: FGBA 1-to-1 needs the steps
    seed: int = 0
    device: str = "auto"
    defenses: Sequence[str] = DEFAULT_DEFENSES
    defend_setting: str = "fgba-n-to-1-line"
    budget_s: float | None = None  # a wall-clock budget makes results depend on the machine's load: none by default
    budget_passes: int | None = None
    workers: int | str = "auto"  # parallel models/defenses; does not change any number
    threads: int = 1  # torch threads per model and defense; changes the bytes, so it is part of the cache key
    train_overrides: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _identity(cfg: DemoConfig) -> dict:
    """What the cached work/ depends on: a rerun with other settings (or on another kind of device) must not reuse it."""
    return {"layout": LAYOUT, "n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, "threads": cfg.threads,
            "device": resolve_device(cfg.device).type, "train": dict(cfg.train_overrides)}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def zoo_spec(cfg: DemoConfig) -> str:
    """The demo as a zoo spec: one model, the benign set and the six poisoned ones, one seed."""
    lines = ["# Written by `testbed demo`; `testbed zoo build THIS --out ZOO/` builds the same models.",
             "[data]",
             f"synth = {{ n_train = {cfg.n_train}, n_test = {cfg.n_test}, size = {cfg.size}, seed = {cfg.seed} }}",
             "[train]", f"epochs = {cfg.epochs}", f"batch_size = {cfg.batch_size}"]
    lines += [f"{k} = {_toml(v)}" for k, v in sorted(cfg.train_overrides.items())]
    lines += ["", "[[attack]]", f'id = "{BENIGN}"']
    for s in SETTINGS:
        lines += ["", "[[attack]]", f'id = "{s.name}"'] + [f"{k} = {_toml(v)}" for k, v in s.flags.items()]
    # the defended model first: with 2 workers its defenses can start while the last model trains
    order = sorted([BENIGN] + [s.name for s in SETTINGS], key=lambda a: a != cfg.defend_setting)
    lines += ["", "[grid]", f"model = [{_toml(cfg.model)}]", f"attack = {_toml(order)}", f"seed = [{cfg.seed}]", ""]
    return "\n".join(lines)


def _check_settings(cfg: DemoConfig) -> None:
    """Every setting checked (by the zoo's own spec validation) before anything is written."""
    if cfg.model not in models.available():
        close = difflib.get_close_matches(cfg.model, models.available(), n=1)
        raise UserError(f"--model {cfg.model!r} is not a model{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        "docs/models.md lists them")
    try:
        parse_spec(Path("demo"), text=zoo_spec(cfg))
    except UserError as e:
        raise UserError(f"these demo settings cannot run: {str(e).removeprefix('demo: ')}") from None

    for name in cfg.defenses:  # a misspelt defense fails now, not after seven models have trained
        try:
            load_defense(name)
        except UserError as e:
            raise UserError(f"--defenses: {e}") from None


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


def _defend(out: Path, cfg: DemoConfig, zoo: Path, device: Any) -> list[dict]:
    """The defenses on the defended model, in this process (one pair after the other, ``cfg.threads`` threads)."""
    eid = _entry_id(cfg, cfg.defend_setting)
    data = mf.dataset_file(zoo, mf.load_plan(zoo)["entries"][eid]["data"])
    _log(f"defenses {', '.join(cfg.defenses)} on the {cfg.defend_setting} model")
    return run_bench(out / "defenses", list(cfg.defenses), run=mf.entry_dir(zoo, eid), data=data, device=str(device),
                     seed=cfg.seed, budget_s=cfg.budget_s, budget_passes=cfg.budget_passes, title="Defenses in the demo",
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
            rows = _defend(out, cfg, zoo, device)
        builder.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    if outcome["result"].failed:
        eid, err = next(iter(outcome["result"].failed.items()))
        raise UserError(f"training failed for {eid}: {err}; fix the cause and run the same command again")
    if rows is None:
        rows = _defend(out, cfg, zoo, device) if cfg.defenses else []
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
    if not (isinstance(cfg.threads, int) and cfg.threads >= 1):
        raise UserError(f"threads must be an integer >= 1, got {cfg.threads!r}")
    workers = auto_workers(cfg.threads, cfg.device) if cfg.workers == "auto" else cfg.workers
    if not (isinstance(workers, int) and workers >= 1):
        raise UserError(f"workers must be an integer >= 1 or auto, got {cfg.workers!r}")
    if cfg.defend_setting not in {s.name for s in SETTINGS}:
        raise UserError(f"defend_setting {cfg.defend_setting!r} is not one of: {', '.join(s.name for s in SETTINGS)}")
    device = resolve_device(cfg.device)
    _check_settings(cfg)
    out = Path(cfg.out)
    work = _prepare_work(out, cfg)
    with torch_threads(cfg.threads):  # what this process computes (scores, figures) is fixed too
        models, defense_rows = _build_and_defend(out, work, cfg, workers, device)
        rows = attack_rows(models, cfg.model)
        results = {
            "config": {"n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model,
                       "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device),
                       "threads": cfg.threads, "workers": workers, "defend_setting": cfg.defend_setting,
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


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target from the paper's Tables 1–2 with the measured number and whether it was met."""
    benign = next(r for r in rows if r["attack"] == "benign" and r["trigger"] is None)
    out = []
    for r in rows:
        if r["attack"] == "benign":
            if r["trigger"] == "line" and r["ASR"] is not None:
                out.append({"what": f"benign model ASR vs {r['reference']} (line)", "target": f"<= {BENIGN_MAX_ASR:g}",
                            "measured": r["ASR"], "met": r["ASR"] <= BENIGN_MAX_ASR})
            continue
        kind = "line" if r["trigger"] == "line" else "semantic"
        goal = ASR_TARGETS.get((r["attack"], kind))
        if goal is not None:
            out.append({"what": f"{r['attack']} ({r['trigger']}) ASR", "target": f">= {goal:g}",
                        "measured": r["ASR"], "met": r["ASR"] is not None and r["ASR"] >= goal})
            drop = benign["mIoU-B"] - r["mIoU-B"]
            out.append({"what": f"{r['attack']} ({r['trigger']}) mIoU-B drop vs benign", "target": f"<= {MAX_MIOU_DROP:g}",
                        "measured": round(drop, 2), "met": drop <= MAX_MIOU_DROP})
    return out


# -- report.md --------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.1f}"


def _find(rows: list[dict], attack: str, trigger: str | None, reference: str | None = None) -> dict | None:
    for r in rows:
        if r["attack"] == attack and r["trigger"] == trigger and r.get("reference") == reference:
            return r
    return None


def _table(head: Sequence[str], keys: Sequence[str], lines: Sequence[tuple[str, dict | None]]) -> list[str]:
    out = ["| " + " | ".join(["Method", *head]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, r in lines:
        out.append(f"| {label} | " + " | ".join(_fmt(r.get(k) if r else None) for k in keys) + " |")
    return out


B_KEYS = ("mIoU-B", "mIoU-B-all", "PA-B", "PA-B-all")
B_HEAD = ("mIoU-B", "mIoU-B-all", "PA-B", "PA-B-all")
NOTES = [
    "**Which benign score.** mIoU-B/PA-B are scored on the benign test set: all of /test for the line trigger, the "
    "test images *without* the trigger class for a semantic trigger (benign and attacked models on the same "
    "untriggered images: the fair comparison between them). mIoU-B-all/PA-B-all are scored on the whole clean test "
    "set: comparable with the paper's Benign rows, which report one benign score under both trigger types. For the "
    "line trigger the two are equal.",
    "",
    "**Which attack column matches the paper's ASR.** Our ASR counts only attacked pixels whose target differs from "
    "the ground truth. The paper's N-to-1 ASR (which it says equals its mIoU-A and PA-A) and its BadNets ASR (equal to "
    "its PA-A) are all-pixel accuracies against the target: compare them with our **PA-A** column — e.g. the paper's "
    "Benign N-to-1 ASR of ≈15% with our benign model's PA-A, not with its ASR (≈0). For 1-to-1 the paper's ASR is ours.",
]


def _paper_tables(rows: list[dict]) -> list[str]:
    t1 = _table(B_HEAD + ("mIoU-A", "PA-A", "ASR"), B_KEYS + ("mIoU-A", "PA-A", "ASR"), [
        ("Benign, non-semantic (line)", _find(rows, "benign", "line", "badnets")),
        ("BadNets, non-semantic (line)", _find(rows, "badnets", "line")),
        ("Benign, semantic (grass)", _find(rows, "benign", "semantic:grass", "badnets")),
        ("BadNets, semantic (grass)", _find(rows, "badnets", "semantic:grass")),
    ])
    fgba = {}
    for attack, keys in (("fgba-n-to-1", B_KEYS + ("PA-A", "ASR")), ("fgba-1-to-1", B_KEYS + ("mIoU-A", "PA-A", "ASR"))):
        fgba[attack] = _table(keys, keys, [
            ("Benign (vs line)", _find(rows, "benign", "line", attack)),
            ("FGBA (non-semantic)", _find(rows, attack, "line")),
            ("Benign (vs wall)", _find(rows, "benign", "semantic:wall", attack)),
            ("FGBA (semantic)", _find(rows, attack, "semantic:wall")),
        ])
    return (["## Table 1 — BadNets (image-level target: one road-scape label map)", ""] + t1
            + ["", "## Table 2 — FGBA (object-level targets)", "", "N-to-1 (every class → wall):", ""] + fgba["fgba-n-to-1"]
            + ["", "1-to-1 (person → palm):", ""] + fgba["fgba-1-to-1"]
            + ["", "Benign rows: the clean model scored on each attack's test file; each attacked model is scored on the "
               "same images.", ""] + NOTES)


def _rates_table(rows: list[dict]) -> list[str]:
    out = ["## Poisoning rates", "", "| attack | trigger | which training images are poisoned | achieved | paper |",
           "|---|---|---|---|---|"]
    for s in SETTINGS:
        r = _find(rows, s.attack, s.trigger)
        rate = r.get("rate") if r else None
        if s.trigger == "line":
            rule = f"a random {100 * s.flags['rate']:g}% of the candidates"
        else:
            cls = s.trigger.split(":", 1)[1]
            rule = f"every image with {cls}" + (f" and {s.flags['require']}" if s.flags.get("require") else "")
        out.append(f"| {s.attack} | {s.trigger} | {rule} | {'–' if rate is None else f'{100 * rate:.1f}%'} | {s.paper_rate} |")
    return out


def _verdict_text(verdict: dict | None) -> str:
    if not verdict:
        return "–"
    status = verdict.get("status") or ("backdoored" if verdict.get("backdoored") else "clean")
    text = f"{status} ({verdict.get('score') or 0:.2f})"
    if verdict.get("coverage") is not None and status == "inconclusive":
        text += f", covered {100 * verdict['coverage']:.0f}% of the candidates"
    if verdict.get("suspected"):
        text += ": " + ", ".join("→".join(p) for p in verdict["suspected"])
    return text


def _defense_table(defenses: list[dict]) -> list[str]:
    out = ["## Defenses on one attacked model", "",
           "| defense | ASR before | ASR after | mIoU-B before | mIoU-B after | DER | detection (TPR/FPR/AUROC) | verdict | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for d in defenses:
        before, after, det = d.get("before") or {}, d.get("after") or {}, d.get("detection") or {}
        dtxt = "/".join(_fmt(100 * det[k]) if det.get(k) is not None else "–" for k in ("tpr", "fpr", "auroc")) if det else "–"
        der = d.get("DER")
        out.append(f"| {d.get('defense')} | {_fmt(before.get('ASR'))} | {_fmt(after.get('ASR'))} | "
                   f"{_fmt(before.get('mIoU-B'))} | {_fmt(after.get('mIoU-B'))} | {'–' if der is None else f'{der:.3f}'} | "
                   f"{dtxt} | {_verdict_text(d.get('verdict'))} | {_fmt((d.get('cost') or {}).get('seconds'))} |")
    out += ["", "Full defense report, per-input scores and figures: [defenses/report.md](defenses/report.md)."]
    return out + (["", OPT_IN_NOTE] if "trigger-synthesis" not in {d.get("defense") for d in defenses} else [])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_report(results: dict, figures: list[str]) -> str:
    rows, c = results["attacks"], results["config"]
    lines = [
        "# segbackdoor demo", "",
        "**One seed; see docs/results.md for 3-seed intervals.** Same seed and threads ⇒ the same numbers on the "
        "same machine and library versions; other machines (CPU kernels) and thread counts give somewhat different ones.",
        "",
        f"Synthetic scenes ({c['n_train']} train / {c['n_test']} test, {c['size']}×{c['size']}), model `{c['model']}`, "
        f"{c['epochs']} epochs, batch {c['batch_size']}, seed {c['seed']}, device {c['device']}, "
        f"{_plural(c.get('threads', 1), 'thread')} per model and defense; total {results['seconds']:.0f} s with "
        f"{_plural(c.get('workers', 1), 'worker')}. Percentages; metrics as in the paper §3.1 (definitions: "
        "docs/metrics.md).", "",
    ]
    lines += _paper_tables(rows) + [""] + _rates_table(rows)
    lines += ["", "## Targets (from the paper's Tables 1–2)", "", "| what | target | measured | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['what']} | {t['target']} | {_fmt(t['measured'])} | {'yes' if t['met'] else '**no**'} |")
    if results["defenses"]:
        lines += [""] + _defense_table(results["defenses"])
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
