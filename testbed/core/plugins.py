"""Finding extensions: a built-in name, ``package.module:Class``, or an entry point of a group.

Attacks (group ``testbed.attacks``) and defenses (group ``testbed.defenses``) are found the same way, so an
outside package extends either without an edit to the project.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Mapping

from testbed.core.errors import UserError, did_you_mean


def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def import_object(spec: str, what: str) -> Any:
    """``package.module:Attr[.sub]`` → the object; a clean error naming ``what`` (e.g. "--attack") otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {spec!r}: write an outside class as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({e}); install the package or add it "
                        "to PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} {spec!r}: module {module_name!r} has no {attr!r}; check the class name")
        obj = getattr(obj, part)
    return obj


def resolve(spec: str, builtins: Mapping[str, Any], group: str, what: str) -> tuple[Any, str]:
    """(object, where it came from) for a built-in name, ``package.module:Class`` or an entry-point name."""
    name = spec.strip()
    if name in builtins:
        return builtins[name], f"built-in {name!r}"
    if ":" in name:
        return import_object(name, what), name
    eps = entry_points(group)
    if name not in eps:
        plugins = sorted(set(eps) - set(builtins))
        others = f"; installed plugins: {', '.join(plugins)}" if plugins else ""
        raise UserError(f"unknown {what} {name!r}{did_you_mean(name, [*builtins, *plugins])}; built-ins: "
                        f"{', '.join(sorted(builtins))}{others}; an outside one is named package.module:Class or "
                        f"registered in the entry-point group {group}")
    try:
        return eps[name].load(), f"plugin {name!r} ({eps[name].value})"
    except Exception as e:  # a broken plugin is the user's to fix
        raise UserError(f"{what} plugin {name!r} ({eps[name].value}) failed to load: {type(e).__name__}: {e}") from None
