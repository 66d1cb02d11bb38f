"""`testbed demo`: the README's main command — the paper's Tables 1–2 and a defense table on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.errors import UserError

EXAMPLES = """\
examples:
  testbed demo                              # everything, ~10 minutes on 2 CPU cores, into demo-out/
  testbed demo --out /tmp/d --epochs 4      # quicker, lower attack success
  testbed demo --defenses strip,fine-pruning

OUT/ receives report.md (tables shaped like the paper's Tables 1-2, the SPEC targets, a defense table),
results.json, figure-*.png, defenses/ (the bench report) and work/ (datasets and runs; a rerun after a
crash or Ctrl-C continues from there).
"""


def register(subparsers) -> None:
    from testbed.demo import DEFAULT_DEFENSES, DemoConfig

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
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, poisoning and training (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                   help="comma-separated defenses to run on the FGBA N-to-1 line model; '' for none (default %(default)s)")
    p.add_argument("--budget", type=float, default=d.budget_s, help="seconds per defense (default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from testbed.demo import DemoConfig, run_demo

    for name in ("n_train", "n_test", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cfg = DemoConfig(out=args.out, n_train=args.n_train, n_test=args.n_test, size=args.size, model=args.model,
                     epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                     defenses=tuple(x for x in args.defenses.split(",") if x.strip()), budget_s=args.budget)
    run_demo(cfg)
    return 0
