"""Finding defenses: built-ins by name, outside ones as ``package.module:Class`` or through the entry-point
group ``testbed.defenses``, their parameters, and ``DEFENSE.KEY=VALUE`` parameter parsing.

Why here, in the defenses package: the name table sits beside the files it lists (a new built-in is its
file plus one line in :data:`BUILTIN`), and `testbed defend`, `testbed bench`, the suites and the demo all
load through :func:`load_defense`, so a plugin and a built-in are found, and refused, the same way.  The
search itself (built-in, ``module:Class``, entry point, "did you mean") is :mod:`testbed.plugins`, shared
with attacks.  The runner (``testbed.defense_runner``) never needs to know where a defense came from.
"""

from __future__ import annotations

import json
from typing import Any

from testbed.defenses.activation_clustering import ActivationClustering
from testbed.defenses.fine_pruning import FinePruning
from testbed.defenses.spectral_signature import SpectralSignature
from testbed.defenses.strip import Strip
from testbed.defenses.trigger_synthesis import TriggerSynthesis
from testbed.errors import UserError
from testbed.plugins import resolve

ENTRY_POINT_GROUP = "testbed.defenses"
BUILTIN: dict[str, type] = {cls.name: cls for cls in (FinePruning, TriggerSynthesis, Strip, ActivationClustering,
                                                      SpectralSignature)}


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
        try:
            obj = obj(**params)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad parameters {sorted(params)} ({e}); see the defense's documentation") from None
    elif params:
        raise UserError(f"{source} is an object, not a class; parameters {sorted(params)} cannot be passed to it")
    name_attr = getattr(obj, "name", None)
    if not isinstance(name_attr, str) or not name_attr or not callable(getattr(obj, "run", None)):
        raise UserError(
            f"{source} is not a defense: it needs a string attribute `name` and a method `run(model, ctx) -> DefenseResult` "
            "(see docs/writing-a-defense.md)"
        )
    return obj


def parse_value(text: str) -> Any:
    """A parameter value as typed on a command line: JSON when it parses (``16``, ``[3, 5]``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(items: list[str] | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """``["strip.n_overlays=16", ...]`` → ``{"strip": {"n_overlays": 16}}`` for the defenses in ``names``."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items or []:
        key, eq, value = item.partition("=")
        defense, dot, param = key.rpartition(".")
        if not eq or not dot or not defense or not param:
            raise UserError(f"--param {item!r}: write it as DEFENSE.KEY=VALUE, e.g. strip.n_overlays=16")
        if defense not in out:
            raise UserError(f"--param {item!r}: {defense!r} is not one of the --defense names ({', '.join(names)})")
        out[defense][param] = parse_value(value)
    return out
