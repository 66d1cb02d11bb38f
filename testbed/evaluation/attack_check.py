"""Did the attack implant?  The guard against numbers about a backdoor that is not there.

A zoo entry or run whose attack failed (its attacked test set's ASR is low) still gets a DER from a bench
(removing a backdoor that never existed scores as a success) and passes an ASR criterion in a suite.
Every front end asks here instead: `testbed bench` shows DER as n/a with the reason, the suites skip the
criteria that need a backdoor, and `testbed zoo ls` marks the entry.  The threshold is the model's ASR
*before* any defense, in percent (default 50: the backdoor works on less than half of its pixels).
"""

from __future__ import annotations

import math
from typing import Any

from testbed.core.errors import UserError

MIN_ASR = 50.0


def check_min_asr(min_asr: Any, name: str = "min_asr") -> float:
    """``min_asr`` as a float in [0, 100]; a one-line error naming ``name`` otherwise."""
    try:
        value = float(min_asr)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(min_asr, bool) or not 0 <= value <= 100:
        raise UserError(f"{name} must be a percentage in [0, 100], got {min_asr!r}")
    return value


def attack_failure(asr: float | None, benign: bool | None, min_asr: float = MIN_ASR) -> str | None:
    """Why a backdoored model's numbers mean nothing (its ASR before any defense is below ``min_asr``), or None.

    None also when there is nothing to judge: a benign (or unknown) model, or no attacked test set (ASR None).
    """
    if benign is not False or asr is None or (isinstance(asr, float) and math.isnan(asr)):
        return None
    if float(asr) >= min_asr:
        return None
    return f"the attack did not implant: ASR {float(asr):.1f}% before any defense < {min_asr:g}%"


def attack_status(is_benign: bool, asr: float | None, min_asr: float = MIN_ASR) -> str:
    """One word (or a short phrase) for a zoo listing: ``benign``, ``implanted``, ``FAILED (ASR 3.1% < 50%)``,
    or ``-`` (no ASR recorded yet)."""
    if is_benign:
        return "benign"
    if asr is None:
        return "-"
    return "implanted" if float(asr) >= min_asr else f"FAILED (ASR {float(asr):.1f}% < {min_asr:g}%)"
