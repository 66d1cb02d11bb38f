"""Finding defenses: built-ins by name, outside ones as ``package.module:Class`` or through the entry-point
group ``testbed.defenses``, their parameters, and ``DEFENSE.KEY=VALUE`` parameter parsing.

Why here, in the defenses package: the name table sits beside the files it lists (a new built-in is its
file plus one line in :data:`BUILTIN`), and `testbed defend`, `testbed bench`, the suites and the demo all
load through :func:`load_defense`, so a plugin and a built-in are found, and refused, the same way.  The
search itself (built-in, ``module:Class``, entry point, "did you mean") is :mod:`testbed.core.plugins`, shared
with attacks.  The runner (``testbed.evaluation.runner``) never needs to know where a defense came from.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

from testbed.defenses.abl import ABL
from testbed.defenses.activation_clustering import ActivationClustering
from testbed.defenses.anp import ANP
from testbed.defenses.clp import CLP
from testbed.defenses.fine_pruning import FinePruning
from testbed.defenses.ft import FineTuning
from testbed.defenses.ibau import IBAU
from testbed.defenses.nad import NAD
from testbed.defenses.scale_up import ScaleUp
from testbed.defenses.spectral_signature import SpectralSignature
from testbed.defenses.strip import Strip
from testbed.defenses.trigger_synthesis import TriggerSynthesis
from testbed.core.errors import UserError, did_you_mean
from testbed.core.plugins import entry_points, resolve

ENTRY_POINT_GROUP = "testbed.defenses"
BUILTIN: dict[str, type] = {cls.name: cls for cls in (FinePruning, TriggerSynthesis, Strip, ActivationClustering,
                                                      SpectralSignature, FineTuning, NAD, ANP, CLP,
                                                      IBAU, ABL, ScaleUp)}


def builtin_defenses() -> dict[str, type]:
    """Name → class of the built-in defenses (a copy: callers may change it freely)."""
    return dict(BUILTIN)


def load_defense(spec: Any, **params: Any) -> Any:
    """A defense object from a built-in name, ``package.module:Class``, or an entry point in ``testbed.defenses``.

    ``params`` go to the class's ``__init__`` (keyword arguments).  An object that already is a defense is
    returned as is (``params`` must then be empty).  Every problem is a one-line :class:`UserError`.
    """
    if isinstance(spec, str):
        obj, source = resolve(spec, BUILTIN, ENTRY_POINT_GROUP, "defense")
    else:
        obj, source = spec, repr(spec)
    if isinstance(obj, type):
        known = [p.name for p in defense_params(obj)]
        unknown = [] if _takes_any_keyword(obj) else [k for k in params if k not in known]
        if unknown:
            raise UserError(f"{source} has no parameter {unknown[0]!r}{did_you_mean(unknown[0], known)}; its parameters: "
                            f"{', '.join(known)} (see `testbed defenses`)")
        try:
            obj = obj(**params)
            _check(obj)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad parameters {sorted(params)} ({e}); see `testbed defenses`") from None
    elif params:
        raise UserError(f"{source} is an object, not a class; parameters {sorted(params)} cannot be passed to it")
    else:
        try:
            _check(obj)  # an object built by the caller is checked too, before any model is loaded
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad parameters ({e}); see `testbed defenses`") from None
    name_attr = getattr(obj, "name", None)
    if not isinstance(name_attr, str) or not name_attr or not callable(getattr(obj, "run", None)):
        raise UserError(
            f"{source} is not a defense: it needs a string attribute `name` and a method `run(model, ctx) -> DefenseResult` "
            "(see docs/writing-a-defense.md)"
        )
    return obj


def _check(obj: Any) -> None:
    """scikit-learn's convention: ``__init__`` stores, ``check_params()`` (when the class has one) validates."""
    if not isinstance(obj, type) and callable(getattr(obj, "check_params", None)):
        obj.check_params()


def _takes_any_keyword(cls: type) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    except (TypeError, ValueError):
        return True


def parse_value(text: str) -> Any:
    """A parameter value as typed on a command line: JSON when it parses (``16``, ``[3, 5]``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(items: list[str] | None, names: list[str], flag: str = "--param",
                 names_flag: str = "--defense") -> dict[str, dict[str, Any]]:
    """Parameter options → ``{defense: {key: value}}``, one syntax for every front end (``flag`` names the option
    in errors: ``--param`` for `testbed defend`/`bench`, ``--defense-param`` for the suites; ``names_flag`` the
    option that named the defenses: ``--defenses`` for `testbed demo`).

    ``DEFENSE.KEY=VALUE`` where DEFENSE is one of ``names`` as given (``strip``, ``pkg.mod:Class``); a bare
    ``KEY=VALUE`` when exactly one defense is given.  Values are JSON when they parse, else strings.
    """
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    example = f"{flag} {names[0] if names else 'strip'}.KEY=VALUE"
    for item in items or []:
        key, eq, value = item.partition("=")
        defense, dot, param = key.rpartition(".")
        if not dot and eq and key and len(names) == 1:
            defense, param = names[0], key  # bare KEY=VALUE: the only defense
        elif not dot and eq and key:
            raise UserError(f"{flag} {item!r}: {len(names)} defenses are given, so name the one it is for: "
                            f"DEFENSE.KEY=VALUE, e.g. {example.split(' ', 1)[1].replace('KEY=VALUE', key + '=' + value)}")
        if not eq or not defense or not param:
            raise UserError(f"{flag} {item!r}: write it as DEFENSE.KEY=VALUE (or KEY=VALUE with one defense), e.g. "
                            "strip.n_overlays=16")
        if defense not in out:
            raise UserError(f"{flag} {item!r}: {defense!r} is not one of the {names_flag} names ({', '.join(names)})")
        if param in out[defense]:
            raise UserError(f"{flag} {item!r}: {defense}.{param} is given twice; give each parameter once")
        out[defense][param] = parse_value(value)
    return out


# -- what a defense takes, for `testbed defenses` and error messages ---------------------------------
@dataclass(frozen=True)
class ParamInfo:
    """One keyword parameter of a defense class: name, default (``REQUIRED`` if none) and one-line help."""

    name: str
    default: Any
    help: str


REQUIRED = object()


def _doc_help(doc: str, name: str) -> str:
    """What the class docstring says right after ````name````, up to the next parameter or sentence end."""
    doc = " ".join(doc.split())
    m = re.search(r"``" + re.escape(name) + r"``((?:\s*/\s*``\w+``)*)", doc)
    if m is None:
        return ""
    text, depth, out = doc[m.end():], 0, []
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                break
        if depth == 0 and (text.startswith(", ``", i) or text.startswith(". ", i) or text.startswith(".\n", i)
                           or ch == ";" or text.startswith(".", i) and i == len(text) - 1):
            break
        out.append(ch)
    text = "".join(out).strip(" ,.")
    if text.startswith("(") and text.endswith(")") and text.count("(") == 1:
        text = text[1:-1]
    return text


def defense_params(cls: type) -> list[ParamInfo]:
    """The keyword parameters of ``cls.__init__`` with defaults, and help from ``cls.params_doc`` (a dict
    name → text) or else the class docstring's mention of ````name````."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    docs = getattr(cls, "params_doc", None)
    docs = docs if isinstance(docs, dict) else {}
    text = inspect.getdoc(cls) or ""
    out = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = REQUIRED if p.default is p.empty else p.default
        out.append(ParamInfo(p.name, default, str(docs.get(p.name) or _doc_help(text, p.name))))
    return out


def summary(cls: type) -> str:
    """The class docstring's first line (its one-line help)."""
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith("Parameters"):  # a class that documents only its parameters: its module's summary
        doc = inspect.getdoc(inspect.getmodule(cls)) or doc
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def available_defenses() -> list[tuple[str, str, Any]]:
    """``(name, where from, class or the error that stopped it loading)``: built-ins, then installed plugins."""
    out: list[tuple[str, str, Any]] = [(name, "built-in", cls) for name, cls in BUILTIN.items()]
    for name, ep in sorted(entry_points(ENTRY_POINT_GROUP).items()):
        if name in BUILTIN:
            continue
        try:
            obj: Any = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin is listed with its error, not fatal
            obj = UserError(f"failed to load: {type(e).__name__}: {e}")
        out.append((name, f"plugin {ep.value}", obj))
    return out
