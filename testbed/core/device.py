"""--device auto|cpu|cuda[:N] parsing, and the torch thread count work runs with."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from testbed.core.errors import UserError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is a user error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise UserError(f"--device {spec!r} is not a valid device; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise UserError(f"--device {spec!r} is not a valid device; use auto, cpu, cuda or cuda:N")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (unchanged when None or 0), then restore the previous count.

    CPU results depend on the thread count (a convolution's reductions are split per thread), so work that must
    give the same bytes wherever it runs fixes it here.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
