"""An outside defense for segbackdoor: input purification by a median filter.

Thin triggers (a 1–2 pixel line, a small patch) do not survive a median filter much wider than they are,
while large textured regions mostly do.  The defense returns the suspicious model wrapped so that every
input is filtered first; `testbed defend` / `testbed bench` score that wrapped model like any repair.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from testbed.defense import Cost, DefenseContext, DefenseResult

__all__ = ["MedianFilter", "MedianFiltered", "median_filter"]


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median over a ``size``×``size`` window (reflect padding); ``x``: float [N,C,H,W]."""
    if size <= 1:
        return x
    n, c, h, w = x.shape
    pad = size // 2
    xp = F.pad(x, (pad, size - 1 - pad, pad, size - 1 - pad), mode="reflect")
    patches = F.unfold(xp, size)  # [N, C*size*size, H*W]
    return patches.view(n, c, size * size, h * w).median(dim=2).values.view(n, c, h, w)


class MedianFiltered(nn.Module):
    """``model`` behind a median filter: same inputs (float [N,3,H,W] in [0,1]) and outputs ({"out": ...})."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(median_filter(x, self.size))


class MedianFilter:
    """The defense: ``size`` is the window's side in pixels (odd, ≥ 3 to remove anything)."""

    name = "median-filter"
    uses_training_set = False  # the clean subset is all it needs (it uses none of it, in fact)

    def __init__(self, size: int = 3) -> None:
        self.size = size  # scikit-learn's convention: store only; check_params() validates

    def check_params(self) -> None:
        """Called by the testbed right after construction: a bad --param is one line before any work."""
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        t0 = time.perf_counter()
        ctx.progress(1.0, f"median filter {self.size}x{self.size}")
        return DefenseResult(
            model=MedianFiltered(model, self.size).eval(),
            cost=Cost(seconds=time.perf_counter() - t0),
            details={"size": self.size},
        )
