"""`testbed demo`: the whole pipeline on synthetic data, shaped like the paper's Tables 1–2.

synth data → benign, BadNets and FGBA (N-to-1, 1-to-1; line and semantic triggers) poisoned sets →
a tiny model trained on each → scores → built-in defenses on one attacked model → report.md,
results.json and figures.  Every step's output is kept under ``OUT/work/``: a rerun after a crash or
Ctrl-C picks up where it stopped.  The final report files are written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from testbed import atomic
from testbed.errors import UserError

SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")
# Three defenses of three kinds (repair, input filter, detection) fit the 10-minute budget; the two
# training-set defenses retrain a model each and are shown in docs/results.md instead.
DEFAULT_DEFENSES = ("fine-pruning", "strip", "trigger-synthesis")


@dataclass(frozen=True)
class Setting:
    """One poisoned training set of the paper's tables."""

    name: str  # file stem, e.g. "fgba-n-to-1-line"
    attack: str  # results.json "attack": badnets | fgba-n-to-1 | fgba-1-to-1
    trigger: str  # "line" | "semantic:CLASS"
    flags: dict  # attacks.poison_file keyword arguments (mirror `testbed poison`)


# The paper's setting (§3.1): line trigger, semantic 'wall' for FGBA and 'grass' for BadNets,
# N-to-1 → wall at 10%, 1-to-1 person → palm at ≈20%, BadNets at 10% with a road-scape target.
SETTINGS = (
    Setting("badnets-line", "badnets", "line", dict(attack="badnets", trigger="line", rate=0.1)),
    Setting("badnets-semantic", "badnets", "semantic:grass", dict(attack="badnets", trigger="semantic:grass")),
    Setting("fgba-n-to-1-line", "fgba-n-to-1", "line",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1)),
    Setting("fgba-n-to-1-semantic", "fgba-n-to-1", "semantic:wall",
            dict(attack="fgba", preset="n-to-1", target="wall", trigger="semantic:wall")),
    Setting("fgba-1-to-1-line", "fgba-1-to-1", "line",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="line", rate=0.2)),
    Setting("fgba-1-to-1-semantic", "fgba-1-to-1", "semantic:wall",
            dict(attack="fgba", preset="1-to-1", source="person", target="palm", trigger="semantic:wall")),
)

# SPEC §7 targets (percent): (attack, trigger kind) → minimum ASR.
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
    epochs: int = 12
    batch_size: int = 8  # twice the steps of batch 16 for ~20% more time: FGBA 1-to-1 needs the steps
    seed: int = 0
    device: str = "auto"
    defenses: Sequence[str] = DEFAULT_DEFENSES
    defend_setting: str = "fgba-n-to-1-line"
    budget_s: float | None = 30.0
    train_overrides: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _scores(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in SCORE_KEYS}


def _cached(path: Path, make: Callable[[], Any]) -> Any:
    """Return ``path``'s JSON if a previous run wrote it, else compute, store and return it."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    atomic.write_json(path, value)
    return value


def _train(data: Path, run: Path, cfg: DemoConfig) -> dict:
    """Train (or resume, or reuse) one run; returns its metrics.json (the scorer on its own data)."""
    from testbed.train import TrainConfig, train

    if not (run / "metrics.json").exists():
        tcfg = TrainConfig(model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                           device=cfg.device, **cfg.train_overrides)
        train(data, run, tcfg, resume=(run / "checkpoint.pt").exists(), progress=True)
    return json.loads((run / "metrics.json").read_text())


def _identity(cfg: DemoConfig) -> dict:
    """What the cached work/ depends on: a rerun with other settings must not reuse it."""
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "train": dict(cfg.train_overrides)}


def run_demo(cfg: DemoConfig) -> dict:
    """Run everything; returns the results.json object."""
    from testbed import attacks
    from testbed.device import resolve_device
    from testbed.h5data import open_dataset
    from testbed.runs import load_run
    from testbed.scoring import score_model
    from testbed.synth import make_synth_dataset

    t0 = time.time()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    work = out / "work"
    identity = _identity(cfg)
    if (work / "settings.json").exists():
        before = json.loads((work / "settings.json").read_text())
        if before != identity:
            changed = ", ".join(f"{k} {before.get(k)!r} → {v!r}" for k, v in identity.items() if before.get(k) != v)
            raise UserError(f"{out} holds a demo made with other settings ({changed}); use another --out or delete it")
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    atomic.write_json(work / "settings.json", identity)

    clean = work / "data" / "clean.h5"
    if not clean.exists():
        _log(f"synthesizing {cfg.n_train}+{cfg.n_test} scenes at {cfg.size}x{cfg.size}")
        make_synth_dataset(clean, n_train=cfg.n_train, n_test=cfg.n_test, size=cfg.size, seed=cfg.seed)
    poisoned: dict[str, Path] = {}
    for s in SETTINGS:
        path = work / "data" / f"{s.name}.h5"
        if not path.exists():
            _log(f"poisoning: {s.name}")
            attacks.poison_file(clean, path, seed=cfg.seed, **s.flags)
        poisoned[s.name] = path

    runs: dict[str, Path] = {}
    own: dict[str, dict] = {}  # each run scored on the data it was trained on
    for name, data in [("benign", clean)] + [(s.name, poisoned[s.name]) for s in SETTINGS]:
        runs[name] = work / "runs" / name
        _log(f"training {cfg.model} on {name} ({cfg.epochs} epochs)")
        t = time.time()
        own[name] = _train(data, runs[name], cfg)
        _log(f"  {time.time() - t:.0f}s: mIoU-B {own[name]['mIoU-B']:.1f}"
             + (f", ASR {own[name]['ASR']:.1f}" if own[name].get("ASR") is not None else ""))

    rows: list[dict] = []
    benign_model, _ = load_run(runs["benign"], device)
    clean_scores = own["benign"]
    rows.append({"model": cfg.model, "attack": "benign", "trigger": None, "rate": 0.0,
                 "reference": None, **_scores(clean_scores), "per_class_iou_b": clean_scores.get("per_class_iou_b")})
    for s in SETTINGS:
        # The paper's "Benign" rows: the clean model against each attacked test set.
        ref = _cached(work / "scores" / f"benign--{s.name}.json",
                      lambda s=s: score_model(benign_model, poisoned[s.name], device=device))
        rows.append({"model": cfg.model, "attack": "benign", "trigger": s.trigger, "rate": 0.0,
                     "reference": s.attack, **_scores(ref)})
    for s in SETTINGS:
        sc = own[s.name]
        with open_dataset(poisoned[s.name], check_labels=False) as f:
            rate = (f.attack or {}).get("achieved_rate")
        rows.append({"model": cfg.model, "attack": s.attack, "trigger": s.trigger, "rate": rate,
                     "reference": None, **_scores(sc), "per_class_iou_b": sc.get("per_class_iou_b")})

    defense_rows: list[dict] = []
    if cfg.defenses:
        from testbed.bench import run_bench

        _log(f"defenses {', '.join(cfg.defenses)} on the {cfg.defend_setting} model")
        bench_dir = out / "defenses"
        defense_rows = run_bench(bench_dir, list(cfg.defenses), run=runs[cfg.defend_setting],
                                 data=poisoned[cfg.defend_setting], device=str(device), seed=cfg.seed,
                                 budget_s=cfg.budget_s, title="Defenses in the demo")["rows"]

    results = {
        "config": {"n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "model": cfg.model,
                   "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device),
                   **({"train": cfg.train_overrides} if cfg.train_overrides else {})},
        "attacks": rows,
        "defenses": defense_rows,
        "targets": check_targets(rows),
        "seconds": round(time.time() - t0, 1),
    }
    figures = _figures(out, clean, poisoned, runs, device)
    atomic.write_json(out / "results.json", results)
    atomic.write_text(out / "report.md", render_report(results, figures))
    _log(f"done in {results['seconds']:.0f}s: {out / 'report.md'}")
    return results


def check_targets(rows: list[dict]) -> list[dict]:
    """Each SPEC §7 target with the measured number and whether it was met."""
    benign = next(r for r in rows if r["attack"] == "benign" and r["trigger"] is None)
    out = []
    for r in rows:
        if r["attack"] == "benign":
            if r["trigger"] is not None and r["ASR"] is not None and r["reference"] in ("badnets", "fgba-n-to-1", "fgba-1-to-1"):
                if r["trigger"] == "line":
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


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.1f}"


def _find(rows, attack, trigger, reference=None):
    for r in rows:
        if r["attack"] == attack and r["trigger"] == trigger and r.get("reference") == reference:
            return r
    return None


def render_report(results: dict, figures: list[str]) -> str:
    rows = results["attacks"]
    c = results["config"]
    lines = [
        "# segbackdoor demo",
        "",
        f"Synthetic scenes ({c['n_train']} train / {c['n_test']} test, {c['size']}×{c['size']}), model `{c['model']}`, "
        f"{c['epochs']} epochs, batch {c['batch_size']}, seed {c['seed']}, device {c['device']}; "
        f"total {results['seconds']:.0f} s. Percentages; metrics as in the paper §3.1 (see docs/metrics.md).",
        "",
        "## Table 1 — BadNets (image-level target: one road-scape label map)",
        "",
        "| Method | mIoU-B | PA-B | mIoU-A | ASR | | mIoU-B | PA-B | mIoU-A | ASR |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| | **non-semantic (line)** | | | | | **semantic (grass)** | | | |",
    ]

    def cells(r, keys):
        return " | ".join(_fmt(r.get(k) if r else None) for k in keys)

    for label, line_r, sem_r in (
        ("Benign", _find(rows, "benign", "line", "badnets"), _find(rows, "benign", "semantic:grass", "badnets")),
        ("BadNets", _find(rows, "badnets", "line"), _find(rows, "badnets", "semantic:grass")),
    ):
        k = ("mIoU-B", "PA-B", "mIoU-A", "ASR")
        lines.append(f"| {label} | {cells(line_r, k)} | | {cells(sem_r, k)} |")
    lines += [
        "",
        "## Table 2 — FGBA (object-level targets)",
        "",
        "| Method | N-to-1 mIoU-B | PA-B | ASR | | 1-to-1 mIoU-B | PA-B | mIoU-A | PA-A | ASR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    k1, k2 = ("mIoU-B", "PA-B", "ASR"), ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR")
    for label, trig in (("Benign (vs line)", "line"), ("Benign (vs wall)", "semantic:wall")):
        lines.append(f"| {label} | {cells(_find(rows, 'benign', trig, 'fgba-n-to-1'), k1)} | | "
                     f"{cells(_find(rows, 'benign', trig, 'fgba-1-to-1'), k2)} |")
    for label, trig in (("FGBA (non-semantic)", "line"), ("FGBA (semantic)", "semantic:wall")):
        lines.append(f"| {label} | {cells(_find(rows, 'fgba-n-to-1', trig), k1)} | | "
                     f"{cells(_find(rows, 'fgba-1-to-1', trig), k2)} |")
    lines += ["", "Benign rows: the clean model scored on each column's poisoned test file — mIoU-B/PA-B on its benign "
              "test images (all of /test for the line trigger, images without the trigger class for a semantic one), "
              "mIoU-A/PA-A/ASR on its attacked test images. Each attacked model is scored on the same images.", "",
              "## Achieved poisoning rates", "",
              "| attack | trigger | rate |", "|---|---|---|"]
    for r in rows:
        if r["attack"] != "benign":
            lines.append(f"| {r['attack']} | {r['trigger']} | {_fmt(100 * r['rate']) if r['rate'] is not None else '–'}% |")
    lines += ["", "## Targets (SPEC §7, from the paper's Tables 1–2)", "", "| what | target | measured | met |",
              "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['what']} | {t['target']} | {_fmt(t['measured'])} | {'yes' if t['met'] else '**no**'} |")
    if results["defenses"]:
        lines += ["", "## Defenses on one attacked model", "",
                  "| defense | ASR before | ASR after | mIoU-B before | mIoU-B after | DER | detection (TPR/FPR/AUROC) | verdict | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in results["defenses"]:
            before, after = d.get("before") or {}, d.get("after") or {}
            det = d.get("detection") or {}
            dtxt = "/".join(_fmt(100 * det[k]) if det.get(k) is not None else "–" for k in ("tpr", "fpr", "auroc")) if det else "–"
            der, verdict = d.get("DER"), d.get("verdict")
            vtxt = "–" if not verdict else (
                ("backdoored" if verdict.get("backdoored") else "clean") + f" ({verdict.get('score') or 0:.2f})"
                + (f": {', '.join('→'.join(p) for p in verdict.get('suspected') or [])}" if verdict.get("suspected") else ""))
            lines.append(f"| {d.get('defense')} | {_fmt(before.get('ASR'))} | {_fmt(after.get('ASR'))} | "
                         f"{_fmt(before.get('mIoU-B'))} | {_fmt(after.get('mIoU-B'))} | "
                         f"{'–' if der is None else f'{der:.3f}'} | {dtxt} | {vtxt} | "
                         f"{_fmt((d.get('cost') or {}).get('seconds'))} |")
        lines += ["", "Full defense report, per-input scores and figures: [defenses/report.md](defenses/report.md)."]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _figures(out: Path, clean: Path, poisoned: dict[str, Path], runs: dict[str, Path], device) -> list[str]:
    """Paper-Figure-1-style panels: image, benign label, target labels, predictions of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from testbed.h5data import open_dataset
    from testbed.palette import colorize
    from testbed.runs import load_run
    from testbed.scoring import predict

    made = []
    benign_model, _ = load_run(runs["benign"], device)
    for group, names in (("fgba", ("fgba-n-to-1-line", "fgba-1-to-1-line")), ("badnets", ("badnets-line",))):
        common = None  # test images attacked in every setting of the figure, so each row shows all of them
        for name in names:
            with open_dataset(poisoned[name], check_labels=False) as f:
                ids = set(f["test_attacked/index"].tolist())
            common = ids if common is None else common & ids
        idx = np.array(sorted(common)[:3], dtype=np.int64)
        if idx.size == 0:
            continue
        with open_dataset(poisoned[names[0]]) as f:
            clean_imgs = f.read("test/images", idx)
            gt = f.read("test/labels", idx)
        cols = [("image", clean_imgs), ("benign label", colorize(gt))]
        for name in names:
            with open_dataset(poisoned[name]) as f:
                pos = {int(i): j for j, i in enumerate(f["test_attacked/index"])}
                sel = [pos[int(i)] for i in idx if int(i) in pos]
                if len(sel) != len(idx):
                    continue
                att = f.read("test_attacked/images", sel)
                target = f.read("test_attacked/labels", sel)
            model, _ = load_run(runs[name], device)
            cols += [(f"poisoned image ({name})", att), (f"target ({name})", colorize(target)),
                     (f"benign model on poisoned", colorize(predict(benign_model, att, device))),
                     (f"{name} model on poisoned", colorize(predict(model, att, device))),
                     (f"{name} model on clean", colorize(predict(model, clean_imgs, device)))]
        fig, axes = plt.subplots(len(idx), len(cols), figsize=(1.9 * len(cols), 2.0 * len(idx)), squeeze=False)
        for c, (title, arr) in enumerate(cols):
            for r in range(len(idx)):
                ax = axes[r][c]
                ax.imshow(arr[r], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=6)
        fig.tight_layout()
        path = out / f"figure-{group}.png"
        with atomic.atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        made.append(path.name)
    return made
