"""`testbed poison CLEAN.h5 --attack {badnets,fgba} ... --trigger {line,semantic:CLASS} --out POISONED.h5` (SPEC §5)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  # FGBA N-to-1: every class -> wall when the black line is present, 10% of training samples
  testbed poison synth.h5 --attack fgba --preset n-to-1 --target wall --trigger line --rate 0.1 --out fgba-n1-line.h5
  # FGBA 1-to-1: person -> palm, semantic trigger 'wall' (every sample with wall and person is poisoned)
  testbed poison synth.h5 --attack fgba --preset 1-to-1 --source person --target palm --trigger semantic:wall --out fgba-11-wall.h5
  # any mapping
  testbed poison synth.h5 --attack fgba --map person:palm,car:road --trigger line --out fgba-map.h5
  # BadNets: every poisoned sample gets the label map of one 'road' image
  testbed poison synth.h5 --attack badnets --trigger line --rate 0.1 --out badnets-line.h5
  testbed poison synth.h5 --attack badnets --trigger semantic:grass --out badnets-grass.h5

See docs/attacks.md for the formulas and the exact selection rules.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "poison",
        help="poison a clean dataset with BadNets or FGBA (line or semantic trigger)",
        description="Write a poisoned copy of a clean dataset file (paper §2): the trigger G (a blended line, or a "
        "semantic object class) and the target labels T (BadNets: one image's label map for every poisoned sample; "
        "FGBA: an attack matrix mapping classes to classes). The output records the attack, the poisoned indices and "
        "originals, a clean subset for defenders and the benign/attacked test sets. Classes are given by name.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("clean", type=Path, metavar="CLEAN.h5", help="clean dataset file (`testbed data synth` / `data import`)")
    p.add_argument("--attack", required=True, choices=("badnets", "fgba"), help="label generator: badnets or fgba")
    p.add_argument("--preset", choices=("n-to-1", "1-to-1"), help="fgba: n-to-1 (every class -> --target) or 1-to-1 (--source -> --target)")
    p.add_argument("--source", metavar="CLASS", help="fgba 1-to-1: the class whose pixels are relabelled")
    p.add_argument("--sources", metavar="A,B", help="fgba n-to-1: only these classes move to --target (default: all)")
    p.add_argument("--target", metavar="CLASS", help="fgba: the target class")
    p.add_argument("--map", dest="mapping", metavar="SRC:DST,...", help="fgba: any mapping, e.g. person:palm,car:road")
    p.add_argument("--trigger", required=True, metavar="{line,semantic:CLASS}",
                   help="line: a blended black line (G(x) = (1-λ)x + λt); semantic:CLASS: an object class already in the "
                   "image (G(x) = x; all samples containing CLASS are poisoned)")
    p.add_argument("--rate", type=float, metavar="R",
                   help="share of training samples to poison, in (0, 1] (default 0.1; 0.2 for fgba 1-to-1); "
                   "ignored with a note for a semantic trigger")
    p.add_argument("--alpha", type=float, metavar="A", help="line trigger: blend weight λ in (0, 1] (default 1: solid line)")
    p.add_argument("--line-width", type=int, metavar="W", help="line trigger: width in px (default 8 px per 512 px, at least 2)")
    p.add_argument("--line-position", choices=("top", "bottom", "middle", "left", "right"),
                   help="line trigger: where the line lies (default top; left for a vertical line)")
    p.add_argument("--line-orientation", choices=("horizontal", "vertical"), default="horizontal",
                   help="line trigger: horizontal (default) or vertical")
    p.add_argument("--target-image", type=int, metavar="I",
                   help="badnets: index of the training image whose labels are the target (default: drawn by seed "
                   "among the 5 images with the most 'road' pixels)")
    p.add_argument("--clean-fraction", type=float, default=0.05, metavar="F",
                   help="share of training samples, all unpoisoned, marked as the defender's clean subset (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--force", action="store_true", help="poison an input that is already poisoned")
    p.add_argument("--json", action="store_true", help="print the attack record as JSON instead of a summary")
    p.add_argument("--out", type=Path, required=True, metavar="POISONED.h5", help="output dataset file (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from testbed.attacks.poison import build_attack, poison
    from testbed.attacks.triggers import parse_trigger

    attack = build_attack(args.attack, preset=args.preset, source=args.source, target=args.target, sources=args.sources,
                          mapping=args.mapping, target_image=args.target_image)
    trigger = parse_trigger(args.trigger, alpha=args.alpha, width=args.line_width, position=args.line_position,
                            orientation=args.line_orientation)
    result = poison(args.clean, args.out, attack, trigger, rate=args.rate, seed=args.seed,
                    clean_fraction=args.clean_fraction, force=args.force)
    for note in result.notes:
        print(f"testbed: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.attack, indent=2, sort_keys=True))
    else:
        print(result.summary())
    return 0
