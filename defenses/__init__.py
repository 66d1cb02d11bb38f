"""The built-in defenses (docs/defenses.md), each one file implementing the protocol of :mod:`testbed.defenses.protocol`.

``BUILTIN`` (name → class) is defined in :mod:`testbed.defenses.registry`; importing the package loads every
built-in (each imports the protocol module directly, never this package, so there is no cycle).
"""

from __future__ import annotations

from testbed.defenses.registry import (ABL, ANP, BUILTIN, CLP, IBAU, NAD, ActivationClustering, FinePruning,
                                       FineTuning, ScaleUp, SpectralSignature, Strip, TriggerSynthesis)

__all__ = ["BUILTIN", "ABL", "ANP", "CLP", "IBAU", "NAD", "ActivationClustering", "FinePruning", "FineTuning",
           "ScaleUp", "SpectralSignature", "Strip", "TriggerSynthesis"]
