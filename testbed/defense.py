"""The defense protocol's public import path: ``from testbed.defense import Defense, DefenseContext, DefenseResult``.

The definitions live in :mod:`testbed.defenses.protocol`, beside the defenses that implement them; this
module re-exports them so the documented path keeps working (the objects are the same, not copies).
"""

from __future__ import annotations

from testbed.defenses.protocol import (
    Cost,
    Defense,
    DefenseContext,
    DefenseResult,
    ReadOnlyArray,
    TrainingSet,
    Verdict,
    replace,
)

__all__ = ["Cost", "Defense", "DefenseContext", "DefenseResult", "ReadOnlyArray", "TrainingSet", "Verdict", "replace"]
