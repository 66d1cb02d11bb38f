"""Backdoor attacks on semantic segmentation (paper §2): triggers G, label generators T, and the poisoner.

>>> from testbed import attacks
>>> attacks.poison_file("synth.h5", "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line")
>>> attacks.poison("synth.h5", "fgba.h5", attacks.FGBA("1-to-1", source="person", target="palm"),
...                attacks.SemanticTrigger("wall"), seed=0)

A new attack is one module here with ``fit(data, seed)``, ``transform(labels)``, ``changes(labels)``,
``requires(labels)``, ``params()`` and a ``name`` (see FGBA, BadNets), plus a line in ``build_attack``.
"""

from testbed.attacks.badnets import BadNets
from testbed.attacks.fgba import FGBA, apply_attack_matrix, check_attack_matrix
from testbed.attacks.poison import PoisonResult, build_attack, poison, poison_file
from testbed.attacks.triggers import LineTrigger, SemanticTrigger, parse_trigger

__all__ = [
    "FGBA", "BadNets", "LineTrigger", "SemanticTrigger", "parse_trigger", "poison", "poison_file",
    "PoisonResult", "build_attack", "apply_attack_matrix", "check_attack_matrix",
]
