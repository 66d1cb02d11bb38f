"""The built-in defenses (docs/defenses.md), each one file implementing the protocol of :mod:`testbed.defenses.protocol`.

``BUILTIN`` (name → class, defined in :mod:`testbed.defenses.registry`) and the classes are loaded on first
use (PEP 562), not when the package is imported: every defense imports the protocol, which lives in this
package, so an eager import here would be a cycle (and would load every defense's dependencies for anyone
who only wants the protocol).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN", "ABL", "ActivationClustering", "FinePruning", "ScaleUp", "SpectralSignature", "Strip", "TriggerSynthesis"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from testbed.defenses import registry

        if name == "BUILTIN":
            return registry.BUILTIN
        for cls in registry.BUILTIN.values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
