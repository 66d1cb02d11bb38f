"""What counts as an integer and as a number in a plugin's parameter checks (attacks, triggers, defenses).

One rule for every check: an integer is any :class:`numbers.Integral` (``5``, ``numpy.int64(5)``), a number
any finite :class:`numbers.Real` (``0.5``, ``numpy.float32(0.5)``, an integer); ``True``/``False`` are
neither, though Python counts them as ints.  A float with an integral value (``5.0``) is *not* an integer: it
is refused where an integer is asked, with the check's usual one-line error naming the parameter, rather than
silently converted (the constructor only stores its arguments, so a converted value would differ from the
one the user passed, and a float that reaches ``range`` or a tensor shape fails far from the check).
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any, low: int | None = 0) -> bool:
    """``value`` is an integer (not a bool) and ``>= low`` (no lower bound when ``low`` is None)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (low is None or value >= low)


def is_num(value: Any) -> bool:
    """``value`` is a finite real number (integers included, bools not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
