"""Turning results into plain JSON: the one sanitiser, with one rule for numbers that JSON cannot hold.

Why one: reports, run metrics and zoo records are compared across runs and read by other tools; a NaN that
one writer turns into ``null`` and another into a string (or a crash in ``json.dumps(allow_nan=False)``)
makes the same measurement look different.  The rule: NaN and ±inf become ``None`` (JSON ``null``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types: dicts (keys as strings), lists (from tuples, arrays, tensors), numbers,
    booleans, strings, ``None``.  NaN/±inf → ``None``; numpy scalars → Python numbers; anything else → ``str``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if _is_tensor(x):
        return jsonable(x.detach().cpu().numpy())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if x is None or isinstance(x, (int, str)):
        return x
    return str(x)


def _is_tensor(x: Any) -> bool:
    """A torch tensor, without importing torch for callers that never hold one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
