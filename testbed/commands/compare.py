"""`testbed compare REPORT/ --defense A --vs B`: paired differences of two defenses on the models both ran on.

Reads an existing report's results.json and writes nothing; the statistics are :func:`testbed.stats.compare`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed.core.seeds import seed_arg

EXAMPLES = """examples:
  testbed compare bench-zoo/ --defense fine-pruning --vs none
  testbed compare bench-zoo/ --defense strip --vs fine-pruning
  testbed compare bench-zoo/ --defense strip --vs none --json > strip-vs-none.json

output, one line per metric (A − B; DER as a fraction, ASR and mIoU-B in percentage points):
  A − B: DER +MEAN [LO, HI], n=N models, p=P      (n=1: "+MEAN, n=1 model, no interval")
  beyond 20 models the p is sampled and written p≈P (Monte Carlo); with fewer than 6 models the test cannot
  reach p < 0.05 and the line says so, as it does when the t-interval and the test disagree
  A − B: DER: no pairs with values — WHY       (no shared model has values for both: the attack did not
  implant or gained nothing over the zoo's benign model, benign models, failed runs or a verdict-only defense;
  counted per reason when they mix)

A defense run with parameters is named with them (blur[sigma=0.5]); --defense and --vs take that name, the bare
name when the report holds one parameter set of it, or the name given to `testbed bench` (package.module:Class).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two defenses in a bench report: mean difference, 95%% interval, p-value",
        description="Compare defense A with defense B (or with 'none', doing nothing: after = before, DER 0.5) on the "
        "models both ran on, matched by model id: the per-model differences A − B of DER, ASR after and mIoU-B "
        "after, their mean with a 95% t-interval, the number of models, and the two-sided p of an exact sign-flip "
        "permutation test (all 2^n sign patterns up to 20 models, seeded Monte Carlo beyond). A failed run or a null "
        "value leaves that model out of that metric. Reads REPORT/results.json; writes nothing. "
        "See docs/metrics.md, \"Statistics\".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("report", type=Path, metavar="REPORT/", help="a report directory written by `testbed bench` or `testbed defend`")
    p.add_argument("--defense", required=True, metavar="A",
                   help="the defense to assess: its name in the report (blur, or blur[sigma=0.5] where the report holds "
                   "it with several parameter sets) or the name given to `testbed bench` (package.module:Class)")
    p.add_argument("--vs", required=True, metavar="B", help="the defense to compare against, or 'none' for no defense")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of the Monte Carlo sign patterns, used only beyond 20 models (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from testbed.stats import comparison_lines, compare, read_report

    result = compare(read_report(args.report)["rows"], args.defense, args.vs, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print("\n".join(comparison_lines(result)))
    return 0
