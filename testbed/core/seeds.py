"""The one rule for seeds a user gives: a whole number in 0 .. 2**63 - 1.

Every random choice of the testbed takes a seed, and the libraries under it disagree on what they accept
(``torch.manual_seed`` overflows beyond 64 bits, numpy's legacy seeding beyond 32, ``random`` takes anything);
a seed outside this range is refused with one line naming the flag instead of failing deep inside one of them.
"""

from __future__ import annotations

import argparse
from typing import Any

from testbed.core.errors import UserError
from testbed.core.paramtypes import is_int

MAX_SEED = 2**63 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as a seed, or a :class:`UserError` naming ``name``."""
    if not is_int(value) or value > MAX_SEED:  # numpy integers too (a seed drawn in a sweep)
        raise UserError(f"{name} must be a whole number from 0 to 2**63 - 1, got {str(value)[:40]}")
    return int(value)


def seed_arg(text: str) -> int:
    """argparse ``type=`` for ``--seed``: the same rule, reported by argparse as one line naming the flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {text[:40]}")
    return value
