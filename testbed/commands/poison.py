"""`testbed poison CLEAN.h5 --attack NAME [attack options] [--trigger SPEC [trigger options]] --out POISONED.h5`.

The attack and trigger flags are generated from the attack registry (each attack's ``params_doc``) and the
triggers' ``options_doc``, so a new built-in attack brings its flags with it; an outside attack
(``--attack package.module:Class``) takes its parameters as ``--param KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  # FGBA N-to-1: every class -> wall when the black line is present, 10% of training samples
  testbed poison synth.h5 --attack fgba --preset n-to-1 --target wall --trigger line --rate 0.1 --out fgba-n1-line.h5
  # FGBA 1-to-1: person -> palm, semantic trigger 'wall' (every sample with wall and person is poisoned)
  testbed poison synth.h5 --attack fgba --preset 1-to-1 --source person --target palm --trigger semantic:wall --out fgba-11-wall.h5
  # the paper's semantic N-to-1: poisoned samples hold wall (the trigger) and person
  testbed poison synth.h5 --attack fgba --preset n-to-1 --target wall --trigger semantic:wall --require person --out n1-wall.h5
  # any mapping
  testbed poison synth.h5 --attack fgba --map person:palm,car:road --trigger line --out fgba-map.h5
  # BadNets: every poisoned sample gets the label map of one 'road' image
  testbed poison synth.h5 --attack badnets --trigger line --rate 0.1 --out badnets-line.h5
  testbed poison synth.h5 --attack badnets --trigger semantic:grass --out badnets-grass.h5
  # an attack from outside the project (see docs/writing-an-attack.md)
  testbed poison synth.h5 --attack mypkg.attacks:MyAttack --param strength=3 --trigger line --out mine.h5

See docs/attacks.md for the formulas and the exact selection rules.
"""
FIXED_FLAGS = {"attack": "--attack", "trigger": "--trigger", "force": "--force", "out": "--out"}


def _options():
    """(attack params, trigger options, run options): keyword → Param, for the flags and for error spelling."""
    from testbed.attacks.registry import RUN_OPTIONS, builtin_params
    from testbed.attacks.triggers import trigger_options

    return builtin_params(), trigger_options(), RUN_OPTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    from testbed.attacks.registry import BUILTIN, owners
    from testbed.attacks.triggers import TRIGGERS

    attack_params, trigger_opts, run_opts = _options()
    p = subparsers.add_parser(
        "poison",
        help="poison a clean dataset with an attack (BadNets, FGBA, ...) and a trigger",
        description="Write a poisoned copy of a clean dataset file: the trigger G (a blended line, a semantic object "
        "class, ...) and the target labels T (BadNets: one image's label map for every poisoned sample; FGBA: an "
        "attack matrix mapping classes to classes). The output records the attack, the poisoned indices and "
        "originals, a clean subset for defenders and the benign/attacked test sets. Classes are given by name. "
        "An existing --out is replaced only with --force.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("clean", type=Path, metavar="CLEAN.h5", help="clean dataset file (`testbed data synth` / `data import`)")
    p.add_argument("--attack", required=True, metavar="NAME",
                   help=f"the attack: {', '.join(BUILTIN)}, package.module:Class, or a plugin name from the entry-point "
                   "group testbed.attacks")
    for name, prm in attack_params.items():
        who = "/".join(owners(name))
        p.add_argument(prm.flag_for(name), dest=name, type=prm.type, metavar=prm.metavar, choices=prm.choices,
                       help=f"{who}: {prm.help}")
    trig = ", ".join(f"{n}:CLASS" if t.is_semantic else n for n, t in TRIGGERS.items())
    p.add_argument("--trigger", metavar="SPEC",
                   help=f"the trigger G: {trig}. line: a blended black line (G(x) = (1-λ)x + λt); semantic:CLASS: an "
                   "object class already in the image (G(x) = x; all samples containing CLASS are poisoned)")
    for name, prm in {**trigger_opts, **run_opts}.items():
        p.add_argument(prm.flag_for(name), dest=name, type=prm.type, metavar=prm.metavar, choices=prm.choices,
                       help=prm.help, **({"default": 0} if name == "seed" else {}))
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of an outside attack (JSON value, else a string); repeatable")
    p.add_argument("--force", action="store_true", help="replace an existing --out, or poison an input that is already poisoned")
    p.add_argument("--json", action="store_true", help="print the attack record as JSON instead of a summary")
    p.add_argument("--out", type=Path, required=True, metavar="POISONED.h5", help="output dataset file (written atomically)")
    p.set_defaults(func=run)


def markdown_tables() -> str:
    """The attack and trigger tables of docs/attacks.md and docs/zoo.md, generated from the registries (a test keeps
    the docs equal to it): each attack with its zoo-spec keys and `testbed poison` flags, each trigger with its forms."""
    from testbed.attacks.registry import BUILTIN, params_doc
    from testbed.attacks.triggers import TRIGGERS, trigger_forms
    from testbed.defenses.registry import summary

    def summary_of(cls: Any) -> str:  # the docstring's first sentence (or clause), table-safe
        first = re.split(r"(?<!\bal)\. (?=[A-Z`])|; (?=``)", summary(cls))[0]
        return first.rstrip(".").replace("|", "\\|") + "."

    lines = ["| `attack` | what it does | keys (`testbed poison` flags) |", "|---|---|---|"]
    for name, cls in BUILTIN.items():
        keys = ", ".join(f"`{p.key_for(k)}` (`{p.flag_for(k)}`)" for k, p in params_doc(cls).items())
        lines.append(f"| `{name}` | {summary_of(cls)} | {keys or '—'} |")
    lines += ["", "| `trigger` | what it does | keys (`testbed poison` flags) |", "|---|---|---|"]
    for name, cls in TRIGGERS.items():
        keys = ", ".join(f"`{p.key_for(k)}` (`{p.flag_for(k)}`)" for k, p in getattr(cls, "options_doc", {}).items())
        lines.append(f"| `{trigger_forms(name, cls)}` | {summary_of(cls)} | {keys or '—'} |")
    return "\n".join(lines) + "\n"


def _extra_params(items: list[str]) -> dict[str, Any]:
    from testbed.core.errors import UserError

    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--param {item!r}: write it as KEY=VALUE, e.g. --param strength=3")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def flag_speller(attack_cls: Any = None):
    """keyword → the flag a user typed (``mapping`` → ``--map``); unknown keywords → ``--param KEY``."""
    from testbed.attacks.registry import params_doc

    attack_params, trigger_opts, run_opts = _options()
    known = {**attack_params, **trigger_opts, **run_opts}

    def spell(name: str) -> str:
        if name in FIXED_FLAGS:
            return FIXED_FLAGS[name]
        if name in known:
            return known[name].flag_for(name)
        if attack_cls is not None and name in params_doc(attack_cls):
            return f"--param {name}"
        return name

    return spell


def run(args: argparse.Namespace) -> int:
    from testbed.attacks.poison import poison
    from testbed.attacks.registry import attack_class, build
    from testbed.core.errors import ParamError, UserError

    attack_params, trigger_opts, _ = _options()
    options = {n: getattr(args, n) for n in (*attack_params, *trigger_opts)}
    extra = _extra_params(args.param)
    dup = sorted(k for k in extra if options.get(k) is not None)
    if dup:
        raise UserError(f"--param {dup[0]} is also given as a flag; give it once")
    options.update(extra)
    cls = None
    try:
        cls = attack_class(args.attack)
        attack, trigger = build(cls, args.trigger, **options)
        result = poison(args.clean, args.out, attack, trigger, rate=args.rate, seed=args.seed,
                        clean_fraction=0.05 if args.clean_fraction is None else args.clean_fraction,
                        force=args.force, require=args.require)
    except ParamError as e:
        raise UserError(e.spelled(flag_speller(cls))) from None
    for note in result.notes:
        print(f"testbed: note: {ParamError(note).spelled(flag_speller(cls))}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.attack, indent=2, sort_keys=True))
    else:
        print(result.summary())
    return 0
