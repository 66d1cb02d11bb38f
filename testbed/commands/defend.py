"""`testbed defend RUN/ --data POISONED.h5 --defense NAME[,NAME...] --out OUT/`: defend one trained model.

The same runner and report as `testbed bench --run` (one model); exits 1 when any defense failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  testbed defend runs/fgba/ --data fgba-n1-line.h5 --defense fine-pruning --out defended/
  testbed defend runs/fgba/ --data fgba-n1-line.h5 --defense strip,trigger-synthesis --budget-passes 100000 --out defended/
  testbed defend runs/fgba/ --data fgba-n1-line.h5 --defense median_filter_defense:MedianFilter --param size=5 \\
      --debug --out defended/
  testbed defend runs/fgba/ --data fgba-n1-line.h5 --defense fine-pruning --save-model --out defended/
  testbed score defended/models/fgba--fine-pruning--*/ --data fgba-n1-line.h5

writes OUT/report.md, results.json, results.csv, scores.csv and figures/*.png (see docs/writing-a-defense.md);
an existing OUT/ is merged into (--overwrite starts afresh)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from testbed.commands.bench import add_defense_args

    p = subparsers.add_parser(
        "defend",
        help="run defenses on one trained model and score them before/after",
        description="Run each --defense on the model in RUN/ under the threat model (docs/writing-a-defense.md): "
        "the defense gets a fresh copy of the model, the trusted clean subset of --data (/defense/clean_index) and, only if it declares "
        "uses_training_set, a read-only view of the training images and labels — never the trigger, attack "
        "parameters, poison indices or attacked test set. Its result is scored the same way for every defense: a "
        "repaired model on the benign and attacked test sets, flagged training samples by retraining without them "
        "(original training arguments), an input filter with rejected inputs counted as defended (TPR, FPR, AUROC). "
        "Exits 1 when any defense raised (its error is in the report) or the testbed itself failed (a testbed error).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, metavar="RUN/", help="run directory written by `testbed train`")
    p.add_argument("--data", type=Path, required=True, metavar="POISONED.h5", help="the dataset the model was trained on")
    add_defense_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from testbed.commands.bench import run_cli

    return run_cli(args, run=args.run, data=args.data, title=f"testbed defend {args.run}")
