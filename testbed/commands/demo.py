"""`testbed demo`: the README's main command — the paper's Tables 1–2 and a defense table on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.core.errors import UserError
from testbed.core.seeds import seed_arg

EXAMPLES = """\
examples:
  testbed demo                              # everything, about 5 minutes on 2 CPU cores, into demo-out/
  testbed demo --out /tmp/d --epochs 4      # quicker, lower attack success
  testbed demo --defenses strip,fine-pruning
  testbed demo --param trigger-synthesis.max_candidates=null   # trigger synthesis's full search (+14 CPU-min)

OUT/ receives report.md (tables shaped like the paper's Tables 1-2, the paper's targets, a defense table),
results.json, figure-*.png, defenses/ (the bench report) and work/ (the demo's zoo spec, datasets and models;
a rerun after a crash or Ctrl-C continues from there). One seed: the same seed and --threads give the same
numbers on the same machine and library versions, whatever --workers is.
"""


def register(subparsers) -> None:
    from testbed.commands.zoo import workers_arg
    from testbed.demo.settings import DEFAULT_DEFENSES, DEFAULT_PARAMS, DemoConfig  # not demo.run: it pulls the bench in

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic data (the README's main command)",
        description="Synthesize data, poison it with BadNets and FGBA (N-to-1, 1-to-1; line and semantic "
        "triggers), train a tiny model on each set, score them as in the paper, run built-in defenses on "
        "one attacked model, and write a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=d.out, help="output directory (default %(default)s)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training images (default %(default)s)")
    p.add_argument("--n-test", type=int, default=d.n_test, help="test images (default %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="image size in pixels (default %(default)s)")
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per model (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--seed", type=seed_arg, default=d.seed, help="seed of data, poisoning and training (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                   help="comma-separated defenses to run on the FGBA N-to-1 line model; '' for none (default %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                   help="a defense parameter (repeatable; the value is JSON when it parses); default "
                   f"{' '.join(DEFAULT_PARAMS)}: trigger synthesis runs its first candidate only, a cost analysis "
                   "(null runs every candidate: about 14 CPU-minutes); `testbed defenses` lists every parameter")
    p.add_argument("--budget", type=float, default=d.budget_s, metavar="S",
                   help="wall-clock seconds per defense (default: none; a clock budget depends on the machine's load)")
    p.add_argument("--budget-passes", type=int, default=d.budget_passes, metavar="N",
                   help="forward + backward passes per defense: a budget that stops at the same point under any load")
    p.add_argument("--workers", type=workers_arg, default=d.workers,
                   help="models (and defenses) trained at once: N or auto = cores / --threads (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per model and defense (default %(default)s); the numbers depend on it, "
                   "not on --workers")
    p.set_defaults(func=run)


def run(args) -> int:
    from testbed.demo.run import run_demo
    from testbed.demo.settings import DemoConfig, defense_params

    for name in ("n_train", "n_test", "epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers != "auto" and args.workers < 1:
        raise UserError(f"--workers must be at least 1 or auto, got {args.workers}")
    defenses = tuple(x.strip() for x in args.defenses.split(",") if x.strip())
    cfg = DemoConfig(out=args.out, n_train=args.n_train, n_test=args.n_test, size=args.size, model=args.model,
                     epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                     defenses=defenses, params=defense_params(defenses, args.param), budget_s=args.budget,
                     budget_passes=args.budget_passes, workers=args.workers, threads=args.threads)
    run_demo(cfg)
    return 0
