"""`testbed bench (--zoo ZOO/ | --run RUN/ --data D.h5) --defense ... --out REPORT/`: every defense on every model.

:func:`run_bench` is the Python entry (``testbed demo`` calls it).  Each model × defense pair goes through
:func:`testbed.defense_runner.run_defense`, so a built-in and an outside defense are scored identically;
a defense that fails on one model is recorded and the others still run.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from testbed.errors import UserError

EXAMPLES = """examples:
  testbed bench --run runs/fgba/ --data fgba-n1-line.h5 --defense fine-pruning,strip,spectral-signature --out bench/
  testbed bench --zoo zoo/ --defense trigger-synthesis --budget 60 --out bench-zoo/
  testbed bench --zoo zoo/ --entries '*fgba*' --defense mypkg.defense:MyDefense --param mypkg.defense:MyDefense.k=3 --out b/

writes REPORT/report.md, results.json, results.csv, scores.csv and figures/*.png (see docs/writing-a-defense.md)
"""


@dataclass
class BenchModel:
    """One model to defend: its run, the data it was poisoned with, what attack (for the report)."""

    id: str
    run_dir: Path
    data_path: Path
    attack: str | None = None
    is_benign: bool | None = None


def add_defense_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `testbed defend` and `testbed bench`."""
    p.add_argument("--defense", required=True, metavar="NAME[,NAME...]",
                   help="built-in (fine-pruning, trigger-synthesis, strip, activation-clustering, spectral-signature), "
                   "package.module:Class, or a plugin name from the entry-point group testbed.defenses; comma-separated")
    p.add_argument("--budget", type=float, metavar="S", help="wall-clock budget per defense run in seconds, passed to the "
                   "defense (the report marks runs that exceed it)")
    p.add_argument("--seed", type=int, default=0, help="seed handed to each defense (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass when scoring (default: 32)")
    p.add_argument("--param", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a defense parameter (JSON value, else a string), e.g. strip.n_overlays=16; repeatable")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--out", type=Path, required=True, metavar="OUT/", help="report directory (written atomically)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark defenses on a zoo or one run: before/after ASR, mIoU-B, DER, detection, cost",
        description="Run each --defense on each model (every finished entry of --zoo, or --run with --data) under the "
        "threat model of SPEC §8 (the defense sees only the trusted clean subset and, if it asks, the training set), "
        "score each result the same way before and after, and write a report: report.md, results.json, results.csv, "
        "scores.csv (per-input filter scores) and figures. Verdicts of detection defenses are scored across models "
        "(accuracy and AUROC over benign vs backdoored entries). Exits 1 when any defense run failed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", type=Path, metavar="ZOO/", help="a zoo built by `testbed zoo build`")
    src.add_argument("--run", type=Path, metavar="RUN/", help="one run directory (needs --data)")
    p.add_argument("--data", type=Path, metavar="D.h5", help="the (poisoned) dataset of --run")
    p.add_argument("--entries", metavar="GLOB", help="with --zoo: only entries whose id matches, e.g. '*fgba*'")
    add_defense_args(p)
    p.set_defaults(func=run)


# -- Python API ------------------------------------------------------------------------------------
def split_names(spec: str | Sequence[Any]) -> list[Any]:
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
    import testbed.zoo

    zoo = testbed.zoo.open(zoo_path)
    out = [BenchModel(e.id, Path(e.run_dir), Path(e.data_path), e.attack_id, bool(e.is_benign)) for e in zoo
           if entries is None or fnmatch.fnmatchcase(e.id, entries)]
    if not out:
        what = f" matching {entries!r}" if entries else ""
        raise UserError(f"zoo {zoo_path} has no finished entries{what}; build it with `testbed zoo build` or change --entries")
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise UserError(f"--out {out} exists and is not a defense report; choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)


def _progress_callback(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    from testbed import progress

    bar = progress.bar(total=1000, desc=desc)

    def update(fraction: float, message: str) -> None:
        try:
            target = int(1000 * min(1.0, max(0.0, float(fraction))))
        except (TypeError, ValueError):
            return
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(str(message)[:60], refresh=False)

    return update, bar.close


def run_bench(
    out: str | os.PathLike,
    defenses: str | Sequence[Any],
    *,
    zoo: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    models: Sequence[BenchModel] | None = None,
    entries: str | None = None,
    device: str = "auto",
    seed: int = 0,
    budget_s: float | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 32,
    figures: bool = True,
    title: str = "Defense benchmark",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every defense on every model and write the report into ``out``; returns the results.json content.

    Models come from ``zoo`` (a zoo directory), ``run`` + ``data``, or ``models`` (a list of
    :class:`BenchModel`).  ``defenses``: comma-separated names or a list of names/defense objects.
    """
    from testbed import atomic, report
    from testbed.defense_runner import load_defense, run_defense
    from testbed.device import resolve_device
    from testbed.h5data import open_dataset
    from testbed.runs import load_run
    from testbed.scoring import score_model

    if budget_s is not None and not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise UserError(f"--budget must be a positive number of seconds, got {budget_s!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    specs = split_names(defenses)
    params = dict(params or {})
    unknown = sorted(set(params) - {s for s in specs if isinstance(s, str)})
    if unknown:
        raise UserError(f"parameters given for {', '.join(unknown)}, which is not among the defenses; check --param names")
    names = [load_defense(s, **params.get(s, {})).name if isinstance(s, str) else load_defense(s).name for s in specs]
    if models is None:
        if zoo is not None:
            models = zoo_models(zoo, entries)
        elif run is not None:
            if data is None:
                raise UserError("--run needs --data POISONED.h5 (the dataset the model was trained on)")
            models = [BenchModel(Path(run).name or "model", Path(run), Path(data))]
        else:
            raise UserError("name the models to defend: --zoo ZOO/ or --run RUN/ --data D.h5")
    out = Path(out)
    _check_out(out)
    dev = resolve_device(device)
    say = log or (lambda msg: print(msg, file=sys.stderr))

    rows: list[dict[str, Any]] = []
    classes: dict[str, list[str]] = {}
    for m in models:
        with open_dataset(m.data_path, check_labels=False) as f:
            classes[m.id] = list(f.classes)
            poisoned = f.is_poisoned
        original, _ = load_run(m.run_dir, dev)
        before = score_model(original, m.data_path, device=dev, batch_size=batch_size)
        del original
        benign = (not poisoned) if m.is_benign is None else bool(m.is_benign)
        for spec, name in zip(specs, names):
            defense = load_defense(spec, **params.get(spec, {})) if isinstance(spec, str) else spec
            cb, close = _progress_callback(f"{m.id} × {name}") if progress else (None, lambda: None)
            try:
                row = run_defense(defense, m.run_dir, m.data_path, device=dev, seed=seed, budget_s=budget_s, progress=cb,
                                  batch_size=batch_size, before=before, model_id=m.id, attack=m.attack,
                                  train_progress=progress)
            finally:
                close()
            row["benign_model"] = benign
            rows.append(row)
            say(_summary_line(row))
    meta = {
        "title": title, "zoo": str(zoo) if zoo is not None else None, "data": str(data) if data is not None else None,
        "device": str(dev), "seed": seed, "budget_s": budget_s, "defenses": names,
        "models": [m.id for m in models], "params": params or None,
    }
    with atomic.atomic_dir(out) as tmp:
        doc = report.write_report(tmp, rows, meta=meta, classes=classes, figures=figures)
    doc["errors"] = sum(1 for r in rows if r.get("error"))
    return doc


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _summary_line(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['model']} × {row['defense']}: FAILED ({row['error']})"
    b, a = row.get("before") or {}, row.get("after") or {}
    parts = [f"{row['model']} × {row['defense']}:"]
    if row.get("after"):
        parts.append(f"ASR {_f(b.get('ASR'))} → {_f(a.get('ASR'))}, mIoU-B {_f(b.get('mIoU-B'))} → {_f(a.get('mIoU-B'))}, "
                     f"DER {_f(row.get('DER'), 3)}")
    if row.get("detection"):
        d = row["detection"]
        parts.append(f"TPR {_f(d['tpr'], 3)} FPR {_f(d['fpr'], 3)} AUROC {_f(d['auroc'], 3)}")
    if row.get("flagged"):
        fl = row["flagged"]
        parts.append(f"flagged {fl['count']} (precision {_f(fl['precision'], 3)}, recall {_f(fl['recall'], 3)})")
    if row.get("verdict"):
        v = row["verdict"]
        parts.append(f"verdict {'backdoored' if v['backdoored'] else 'clean'} (score {_f(v['score'])})")
    cost = row.get("cost") or {}
    parts.append(f"{_f(cost.get('seconds'), 1)} s" + (" (over budget)" if cost.get("over_budget") else ""))
    return " ".join(parts)


def run_cli(args: argparse.Namespace, *, zoo=None, run=None, data=None, entries=None, title: str) -> int:
    from testbed import progress
    from testbed.defense_runner import parse_params

    specs = split_names(args.defense)
    params = parse_params(args.param, [s for s in specs if isinstance(s, str)])
    doc = run_bench(
        args.out, specs, zoo=zoo, run=run, data=data, entries=entries, device=args.device, seed=args.seed,
        budget_s=args.budget, params={k: v for k, v in params.items() if v}, batch_size=args.batch_size,
        figures=not args.no_figures, title=title, progress=progress.enabled(),
    )
    print(f"wrote {args.out}/report.md, results.json, results.csv, scores.csv" +
          (f" and {len(doc.get('figures', []))} figures" if doc.get("figures") else ""))
    if doc["errors"]:
        print(f"testbed: {doc['errors']} defense run(s) failed; see {args.out}/report.md", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.run is not None and args.data is None:
        raise UserError("--run needs --data POISONED.h5 (the dataset the model was trained on)")
    if args.zoo is not None and args.data is not None:
        raise UserError("--data goes with --run; a zoo knows each entry's data")
    if args.entries is not None and args.zoo is None:
        raise UserError("--entries filters zoo entries; use it with --zoo")
    return run_cli(args, zoo=args.zoo, run=args.run, data=args.data, entries=args.entries, title="testbed bench")
