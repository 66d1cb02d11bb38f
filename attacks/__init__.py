"""Backdoor attacks on semantic segmentation (paper §2): triggers G, label generators T, and the poisoner.

>>> from testbed import attacks
>>> attacks.poison_file("synth.h5", "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line")
>>> attacks.poison("synth.h5", "fgba.h5", attacks.FGBA("1-to-1", source="person", target="palm"),
...                attacks.SemanticTrigger("wall"), seed=0)

A new attack is one module implementing :class:`Attack` (see docs/writing-an-attack.md) plus a line in
:data:`BUILTIN` (``testbed/attacks/registry.py``), or none: name it ``package.module:Class`` or register it
in the entry-point group ``testbed.attacks``.
"""

from testbed.attacks.badnets import BadNets
from testbed.attacks.base import Attack, Param
from testbed.attacks.blended import BlendedTrigger
from testbed.attacks.fgba import FGBA, apply_attack_matrix, check_attack_matrix
from testbed.attacks.iba import IBA
from testbed.attacks.object_bound import ObjectBound
from testbed.attacks.poison import PoisonResult, PoisonSettings, poison, poison_file
from testbed.attacks.registry import BUILTIN, ENTRY_POINT_GROUP, attack_class, build, build_attack
from testbed.attacks.triggers import TRIGGERS, LineTrigger, SemanticTrigger, Trigger, parse_trigger
from testbed.attacks.warp import WarpTrigger

__all__ = [
    "Attack", "Param", "Trigger", "FGBA", "BadNets", "LineTrigger", "SemanticTrigger", "parse_trigger", "poison",
    "poison_file", "PoisonResult", "PoisonSettings", "build", "build_attack", "attack_class", "BUILTIN", "TRIGGERS", "ENTRY_POINT_GROUP",
    "apply_attack_matrix", "check_attack_matrix", "IBA", "ObjectBound", "BlendedTrigger", "WarpTrigger",
]
