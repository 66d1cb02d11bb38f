"""The attack registry: names → classes, and options → an attack and a trigger.

Built-in attacks are listed once in :data:`BUILTIN` (built from the classes' ``name``); outside attacks are
named ``package.module:Class`` or registered in the entry-point group ``testbed.attacks``.  `testbed poison`,
zoo specs and the demo all go through :func:`build`, so a new attack needs no edit anywhere else.
"""

from __future__ import annotations

import inspect
from typing import Any

from testbed.attacks.badnets import BadNets
from testbed.attacks.base import Param, init_params
from testbed.attacks.fgba import FGBA
from testbed.attacks.iba import IBA
from testbed.attacks.object_bound import ObjectBound
from testbed.attacks.triggers import Trigger, parse_trigger, trigger_options
from testbed.core.errors import ParamError, UserError
from testbed.core.plugins import resolve

ENTRY_POINT_GROUP = "testbed.attacks"
BUILTIN: dict[str, type] = {cls.name: cls for cls in (BadNets, FGBA, IBA, ObjectBound)}

# Options of every poisoning run (not of one attack or trigger); keyword → how users see it.
RUN_OPTIONS: dict[str, Param] = {
    "rate": Param("share of training samples to poison, in (0, 1] (default: the attack's, 0.1; 0.2 for fgba "
                  "1-to-1); ignored with a note for a semantic trigger", type=float, metavar="R"),
    "require": Param("a poisoned sample must also contain this class (the paper's semantic FGBA: person)",
                     metavar="CLASS"),
    "clean_fraction": Param("share of training samples, all unpoisoned, marked as the defender's clean subset "
                            "(default 0.05)", type=float, metavar="F"),
    "seed": Param("seed for every random choice (default 0)", type=int),
}


def attack_class(spec: Any) -> type:
    """The class for ``--attack`` (a built-in name, ``package.module:Class`` or an entry-point name)."""
    if isinstance(spec, type):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ParamError(f"{{attack}} must name an attack, got {spec!r}; built-ins: {', '.join(BUILTIN)}")
    obj, source = resolve(spec, BUILTIN, ENTRY_POINT_GROUP, "attack")
    if not isinstance(obj, type) or not callable(getattr(obj, "fit", None)) or not callable(getattr(obj, "transform", None)):
        raise UserError(f"{source} is not an attack class: it needs fit(data, seed) and transform(labels) "
                        "(see docs/writing-an-attack.md)")
    return obj


def params_doc(cls: type) -> dict[str, Param]:
    """The parameters users may set, by keyword: the class's ``params_doc``, or every ``__init__`` keyword."""
    doc = getattr(cls, "params_doc", None)
    if doc:
        return dict(doc)
    return {n: Param(f"{cls.__name__} parameter {n}", type=_guess_type(p)) for n, p in init_params(cls).items()}


def _guess_type(p: inspect.Parameter):
    d = p.default
    if isinstance(d, bool):
        return lambda s: s.lower() in ("1", "true", "yes")
    return type(d) if isinstance(d, (int, float)) else str


def builtin_params() -> dict[str, Param]:
    """Every built-in attack's parameters (shared keywords such as ``target`` appear once)."""
    out: dict[str, Param] = {}
    for cls in BUILTIN.values():
        for name, p in params_doc(cls).items():
            out.setdefault(name, p)
    return out


def owners(name: str) -> list[str]:
    """The built-in attacks that take parameter ``name``."""
    return [n for n, cls in BUILTIN.items() if name in init_params(cls)]


def build_attack(spec: Any, **params: Any) -> Any:
    """An attack object from ``--attack`` and its parameters (``None`` = not given).

    A parameter the chosen attack does not take is an error that says which attacks take it.
    """
    cls = attack_class(spec)
    given = {k: v for k, v in params.items() if v is not None}
    accepted = init_params(cls)
    foreign = [k for k in given if k not in accepted]
    if foreign:
        name = getattr(cls, "name", cls.__name__)
        takes = ", ".join("{%s}" % k for k in params_doc(cls)) or "no parameters"
        parts = []
        for owner in dict.fromkeys("/".join(owners(k)) for k in foreign):
            mine = ", ".join("{%s}" % k for k in foreign if "/".join(owners(k)) == owner)
            parts.append(f"{mine}: options that belong to {{attack}} {owner}" if owner else f"{mine}: not an option of any attack")
        raise ParamError(f"{'; '.join(parts)}, not to {name}; {name} takes: {takes}")
    try:
        return cls(**given)
    except TypeError as e:
        raise UserError(f"attack {getattr(cls, 'name', cls.__name__)}: bad parameters ({e})") from None


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into (attack parameters, trigger options) by the triggers' option names."""
    trig = trigger_options()
    return ({k: v for k, v in options.items() if k not in trig}, {k: v for k, v in options.items() if k in trig})


def build(attack: Any, trigger: Any = None, **options: Any) -> tuple[Any, Trigger | None]:
    """(attack object, trigger object or None) from `testbed poison`'s attack/trigger options."""
    attack_kw, trigger_kw = split_options(options)
    atk = build_attack(attack, **attack_kw) if isinstance(attack, (str, type)) else attack
    if getattr(atk, "own_trigger", False):
        given = [k for k, v in trigger_kw.items() if v is not None] + (["trigger"] if trigger is not None else [])
        if given:
            raise ParamError(f"{', '.join('{%s}' % k for k in given)} cannot be used with attack {atk.name}: "
                             "it places its own trigger")
        return atk, None
    if trigger is None:
        raise ParamError("{trigger} is required for attack %s (e.g. line or semantic:wall)" % getattr(atk, "name", "?"))
    return atk, parse_trigger(trigger, **trigger_kw)
