"""`testbed bench (--zoo ZOO/ | --run RUN/ --data D.h5) --defense ... --out REPORT/`: every defense on every model.

Argument parsing and printing only; the work is :func:`testbed.bench.run.run_bench` (the Python entry).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.core.errors import UserError
from testbed.core.seeds import seed_arg

EXAMPLES = """examples:
  testbed bench --run runs/fgba/ --data fgba-n1-line.h5 --defense fine-pruning,strip,spectral-signature --out bench/
  testbed bench --zoo zoo/ --defense trigger-synthesis --budget-passes 200000 --out bench-zoo/
  testbed bench --zoo zoo/ --defense strip --out bench-zoo/          # adds strip's rows to the same report
  testbed bench --zoo zoo/ --defense fine-pruning,strip --workers 2 --out bench-zoo/
  testbed bench --zoo zoo/ --entries '*fgba*' --defense mypkg.defense:MyDefense --param k=3 --out b/

writes REPORT/report.md, results.json, results.csv, results-aggregate.csv, scores.csv and figures/*.png
(see docs/writing-a-defense.md; statistics: docs/metrics.md). An existing REPORT/ is merged into: pairs of the
same model and defense are replaced, the others kept, and the report is regenerated from all of them
(--overwrite starts it afresh). A killed bench resumes with the same command; pairs the report already holds
with the same settings are not run again ("N of N pairs already finished; nothing to do"; --rerun redoes them).
"""


def add_defense_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `testbed defend` and `testbed bench`."""
    p.add_argument("--defense", required=True, metavar="NAME[,NAME...]",
                   help="built-in (see `testbed defenses`), package.module:Class, or a plugin name from the entry-point "
                   "group testbed.defenses; comma-separated")
    p.add_argument("--param", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   help="a defense parameter: NAME.KEY=VALUE (NAME as given to --defense, also package.module:Class), or "
                   "KEY=VALUE when one defense is given; the value is JSON when it parses (16, [3,5], null), else a string; "
                   "repeatable; `testbed defenses` lists every parameter")
    p.add_argument("--budget", type=float, metavar="S", help="wall-clock budget per defense run in seconds, passed to the "
                   "defense (the report marks runs that exceed it or that it stopped)")
    p.add_argument("--budget-passes", type=int, metavar="N", help="compute budget per defense run: forward + backward "
                   "passes of one image through the model; unlike --budget it stops at the same point under any load")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed handed to each defense (default: 0)")
    p.add_argument("--min-asr", type=float, default=50.0, metavar="PCT",
                   help="a backdoored model whose ASR before any defense is below PCT%% did not really learn its backdoor: "
                   "its DER is reported as n/a with the reason (default: 50). In a zoo bench, a model whose ASR does not "
                   "exceed the zoo's benign model's ASR on the same attacked set (same architecture and seed) gets n/a too")
    p.add_argument("--save-model", action="store_true", help="keep each repaired or retrained model as a run directory "
                   "(REPORT/models/MODEL--DEFENSE--ID/: model.safetensors + config.json) that score, predict and bench accept")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass when scoring (default: 32)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--overwrite", action="store_true", help="discard an existing report in --out instead of merging into it")
    p.add_argument("--rerun", action="store_true", help="run again the pairs the report already holds with the same "
                   "settings (by default they are kept and not run again)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of a failing defense on the terminal")
    p.add_argument("--out", type=Path, required=True, metavar="OUT/", help="report directory")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark defenses on a zoo or one run: before/after ASR, mIoU-B, DER, detection, cost, statistics",
        description="Run each --defense on each model (every finished entry of --zoo, or --run with --data) under the "
        "threat model (the defense sees only the trusted clean subset and, if it asks, the training set; see docs/writing-a-defense.md), "
        "score each result the same way before and after, and write a report: report.md, results.json, results.csv, "
        "results-aggregate.csv (means and 95% intervals over seeds), scores.csv (per-input filter scores) and figures. "
        "Verdicts of detection defenses are scored across models, defenses are compared pairwise on the same models "
        "(docs/metrics.md). Exits 1 when any defense run failed, or when the testbed itself failed (reported as a "
        "testbed error, not as the defense's failure).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", type=Path, metavar="ZOO/", help="a zoo built by `testbed zoo build`")
    src.add_argument("--run", type=Path, metavar="RUN/", help="one run directory (needs --data)")
    p.add_argument("--data", type=Path, metavar="D.h5", help="the (poisoned) dataset of --run")
    p.add_argument("--public-key", type=Path, metavar="PUB", help="with --zoo: the publisher's public key (PEM); "
                   "refuse the zoo unless its manifest is signed by it (`testbed zoo sign`)")
    p.add_argument("--entries", metavar="GLOB", help="with --zoo: only entries whose id matches the glob, or one of the comma-separated globs, "
                   "e.g. '*fgba*' or '*--benign--*,*-line--*'")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="run N model × defense pairs at once in "
                   "separate processes (default: 1, this process)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes, or Ray tasks on a "
                   "cluster that sees REPORT/ at the same path (the zoo's executor; default: local)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="with --backend ray: the cluster to join (default: start one)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per pair (default: cores ÷ --workers; 1 per "
                   "Ray task); results depend on it, not on --workers")
    add_defense_args(p)
    p.set_defaults(func=run)


def run_cli(args: argparse.Namespace, *, zoo=None, run=None, data=None, entries=None, title: str) -> int:
    """Run the bench for `testbed bench` / `testbed defend`; exit 1 when a defense or the testbed failed."""
    from testbed.bench.run import run_bench, split_names
    from testbed.bench.settings import BenchSettings, Execution, ModelSource, ReportOptions
    from testbed.core import progress
    from testbed.defenses.registry import parse_params

    specs = split_names(args.defense)
    params = parse_params(args.param, [s for s in specs if isinstance(s, str)])
    settings = BenchSettings(seed=args.seed, budget_s=args.budget, budget_passes=args.budget_passes,
                             batch_size=args.batch_size, device=args.device, threads=getattr(args, "threads", None),
                             min_asr=args.min_asr, save_model=args.save_model)
    execution = Execution(workers=getattr(args, "workers", 1), backend=getattr(args, "backend", "local"),
                          ray_address=getattr(args, "ray_address", None), progress=progress.active(), debug=args.debug)
    report = ReportOptions(title=title, figures=not args.no_figures, overwrite=args.overwrite,
                           rerun=getattr(args, "rerun", False))
    doc = run_bench(args.out, specs, ModelSource(zoo=zoo, run=run, data=data, entries=entries), settings,
                    params={k: v for k, v in params.items() if v}, execution=execution, report=report)
    if doc.get("nothing_to_do"):
        return 1 if doc["defense_errors"] or doc["testbed_errors"] else 0
    print(f"wrote {args.out}/report.md, results.json, results.csv, results-aggregate.csv, scores.csv" +
          (f" and {len(doc.get('figures', []))} figures" if doc.get("figures") else ""))
    if doc["defense_errors"]:
        print(f"testbed: {doc['defense_errors']} defense run(s) failed; see {args.out}/report.md"
              + ("" if args.debug else " (--debug prints their tracebacks)"), file=sys.stderr)
    if doc["testbed_errors"]:
        print(f"testbed: testbed error in {doc['testbed_errors']} run(s) or figure(s): a failure of segbackdoor itself, "
              f"not of the defense (please report it); see {args.out}/report.md", file=sys.stderr)
    return 1 if doc["defense_errors"] or doc["testbed_errors"] else 0


def run(args: argparse.Namespace) -> int:
    if args.run is not None and args.data is None:
        raise UserError("--run needs --data POISONED.h5 (the dataset the model was trained on)")
    if args.zoo is not None and args.data is not None:
        raise UserError("--data goes with --run; a zoo knows each entry's data")
    if args.entries is not None and args.zoo is None:
        raise UserError("--entries filters zoo entries; use it with --zoo")
    if args.ray_address is not None and args.backend != "ray":
        raise UserError("--ray-address goes with --backend ray")
    if args.public_key is not None:
        if args.zoo is None:
            raise UserError("--public-key checks a zoo's signature; use it with --zoo")
        from testbed.zoo.signing import require_signed

        require_signed(args.zoo, args.public_key)
    return run_cli(args, zoo=args.zoo, run=args.run, data=args.data, entries=args.entries, title="testbed bench")
