"""The built-in defenses (SPEC §8), each one file implementing ``testbed.defense.Defense``."""

from __future__ import annotations

from defenses.activation_clustering import ActivationClustering
from defenses.fine_pruning import FinePruning
from defenses.spectral_signature import SpectralSignature
from defenses.strip import Strip
from defenses.trigger_synthesis import TriggerSynthesis

BUILTIN: dict[str, type] = {
    "fine-pruning": FinePruning,
    "trigger-synthesis": TriggerSynthesis,
    "strip": Strip,
    "activation-clustering": ActivationClustering,
    "spectral-signature": SpectralSignature,
}

__all__ = ["BUILTIN", "ActivationClustering", "FinePruning", "SpectralSignature", "Strip", "TriggerSynthesis"]
