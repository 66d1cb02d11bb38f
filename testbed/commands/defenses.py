"""`testbed defenses`: every defense this installation can run, with its parameters, defaults and help.

Generated from the classes themselves (:func:`testbed.defenses.registry.defense_params`), so a plugin
installed through the entry-point group ``testbed.defenses`` is listed the moment it is installed, and the
list can never drift from what ``--param`` accepts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXAMPLES = """examples:
  testbed defenses
  testbed defenses --json
  testbed defenses --markdown      # the parameter tables of docs/defenses.md

pass parameters as --param NAME.KEY=VALUE to `testbed defend`/`bench` (--defense-param in the suites)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "defenses",
        help="list the built-in and installed plugin defenses with their parameters and defaults",
        description="List every defense `testbed defend`, `testbed bench` and the suites can run by name: the built-ins, "
        "then plugins installed through the entry-point group testbed.defenses (a plugin that fails to load is "
        "listed with its error). For each: its one-line summary, whether it reads the training set, and every "
        "parameter of its constructor with the default and a one-line help taken from the class. A defense "
        "named package.module:Class is not listed (it is found when named); see docs/writing-a-defense.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    fmt.add_argument("--markdown", action="store_true", help="print markdown tables (as in docs/defenses.md)")
    p.set_defaults(func=run)


def _default(value: Any) -> str:
    from testbed.defenses.registry import REQUIRED

    return "(required)" if value is REQUIRED else json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)


def _cited(cls: type, attr: str) -> str | None:
    """A class's ``paper`` / ``reference`` attribute: a non-empty string, else None (plugins need not set it)."""
    value = getattr(cls, attr, None)
    return value if isinstance(value, str) and value.strip() else None


def _citations(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for the paper and reference code a record names."""
    return [(label, r[key]) for label, key in (("paper", "paper"), ("reference code", "reference")) if r.get(key)]


def describe() -> list[dict[str, Any]]:
    """One record per defense: ``name``, ``source``, ``summary``, ``paper``, ``reference``, ``uses_training_set``,
    ``params`` (or ``error``).  ``paper`` and ``reference`` are the class's optional attributes (None when a
    plugin does not define them)."""
    from testbed.defenses.registry import available_defenses, defense_params, summary

    out = []
    for name, source, obj in available_defenses():
        if isinstance(obj, Exception):
            out.append({"name": name, "source": source, "error": str(obj)})
            continue
        cls = obj if isinstance(obj, type) else type(obj)
        out.append({"name": name, "source": source, "summary": summary(cls),
                    "paper": _cited(cls, "paper"), "reference": _cited(cls, "reference"),
                    "uses_training_set": getattr(cls, "uses_training_set", False) is True,
                    "params": [{"name": p.name, "default": _default(p.default), "help": p.help} for p in defense_params(cls)]})
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """A table of parameters per defense (the generated part of docs/defenses.md)."""
    parts = []
    for r in records:
        parts += [f"### `{r['name']}` ({r['source']})", ""]
        if "error" in r:
            parts += [r["error"], ""]
            continue
        parts += [r["summary"] + (" Reads the training set." if r["uses_training_set"] else ""), ""]
        cited = [f"- {label}: {value}" for label, value in _citations(r)]
        parts += cited + [""] if cited else []
        parts += ["| parameter | default | help |", "|---|---|---|"]
        parts += [f"| `{p['name']}` | `{p['default']}` | {p['help'].replace('|', '/') or '—'} |" for p in r["params"]]
        parts.append("")
    return "\n".join(parts)


def text(records: list[dict[str, Any]]) -> str:
    lines = []
    for r in records:
        if "error" in r:
            lines += [f"{r['name']} ({r['source']}): {r['error']}", ""]
            continue
        lines.append(f"{r['name']} ({r['source']}{', reads the training set' if r['uses_training_set'] else ''})")
        lines.append(f"  {r['summary']}")
        lines += [f"  {label}: {value}" for label, value in _citations(r)]
        width = max((len(p["name"]) + len(p["default"]) for p in r["params"]), default=0) + 3
        for p in r["params"]:
            head = f"{p['name']} = {p['default']}"
            lines.append(f"    {head:<{width}}  {p['help']}".rstrip())
        if not r["params"]:
            lines.append("    (no parameters)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    records = describe()
    if args.json:
        print(json.dumps(records, indent=2))
    elif args.markdown:
        print(markdown(records), end="")
    else:
        print(text(records), end="")
    return 0
