"""The built-in defenses (SPEC §8), each one file implementing ``testbed.defense.Defense``."""

from __future__ import annotations

from testbed.defenses.activation_clustering import ActivationClustering
from testbed.defenses.fine_pruning import FinePruning
from testbed.defenses.spectral_signature import SpectralSignature
from testbed.defenses.strip import Strip
from testbed.defenses.trigger_synthesis import TriggerSynthesis

BUILTIN: dict[str, type] = {
    "fine-pruning": FinePruning,
    "trigger-synthesis": TriggerSynthesis,
    "strip": Strip,
    "activation-clustering": ActivationClustering,
    "spectral-signature": SpectralSignature,
}

__all__ = ["BUILTIN", "ActivationClustering", "FinePruning", "SpectralSignature", "Strip", "TriggerSynthesis"]
