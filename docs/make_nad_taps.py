"""NAD on the architecture zoo's SegFormers with two choices of distilled feature maps, on the same models.

Usage: python docs/make_nad_taps.py [FOLDER]    (default: docs/results/synthetic/findings/nad-taps-segformer)

NAD distils the outputs of its network's last three residual groups. Revision 2 of this testbed's NAD tapped by
default the last three direct children of ``model.backbone`` with a 4-D output: on the tiny CNN
``layer1``-``layer3`` (its stages), on the SegFormer's MiT encoder ``patch_embed4``, ``block4`` and ``norm4`` —
three views of its last stage. Revision 3 taps the outputs of the last three stages by default, on the MiT
encoder ``norm2``-``norm4`` (the same layers as before on the tiny CNN). FOLDER holds the two reports (results.json,
results.csv) on the same 12 models, made at revision 2 by:

    testbed zoo build examples/zoo-arch.toml --out zoo-arch/ --workers 2 --threads 1
    testbed bench --zoo zoo-arch/ --defense nad --workers 2 --threads 1 --out FOLDER/default/
    testbed bench --zoo zoo-arch/ --defense nad --param 'layers=["backbone.norm2","backbone.norm3","backbone.norm4"]' \\
        --workers 2 --threads 1 --out FOLDER/stages/

(with revision 3 the first is `--param 'layers=["backbone.patch_embed4","backbone.block4","backbone.norm4"]'` and
the second plain `--defense nad`). Prints, per attack setting and over all 12 models, mIoU-B and ASR before and
after NAD under both choices and their paired difference by model (revision 2's taps − stages) with its 95%
t-interval and exact sign-flip p.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_results import RESULTS, load_bench, paired_table  # noqa: E402  (this folder's sibling script)

from testbed.core.errors import UserError  # noqa: E402

FOLDER = RESULTS / "synthetic" / "findings" / "nad-taps-segformer"
METRICS = ((("mIoU-B before", lambda r: r["before"]["mIoU-B"], 1), ("mIoU-B after", lambda r: r["after"]["mIoU-B"], 1)),
           (("ASR before", lambda r: r["before"]["ASR"], 1), ("ASR after", lambda r: r["after"]["ASR"], 1)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?", default=FOLDER)
    args = ap.parse_args(argv)
    try:
        default, stages = (load_bench(args.folder / sub) for sub in ("default", "stages"))
        if default is None or stages is None:
            raise UserError("needs default/results.json and stages/results.json")
        tables = [f"\n{after[0]}, NAD revision 2's taps − the last three stages (paired by model)\n\n"
                  + paired_table(default["rows"], stages["rows"], "nad", [before, after], ("rev. 2", "stages"))
                  for before, after in METRICS]
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        print(f"make_nad_taps: {args.folder}: {e}", file=sys.stderr)
        return 2
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
