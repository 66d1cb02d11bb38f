"""--device auto|cpu|cuda[:N] parsing, the torch thread count work runs with, and what the CPU can do in bf16."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path
from typing import Any, Iterator

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


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic (AVX512-BF16, AMX-BF16)
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_support(cpuinfo: Path | None = None) -> dict[str, Any]:
    """Whether this CPU computes in bf16 natively, read from the kernel's CPU flags, never assumed.

    ``{"model", "bf16_flags" (those of :data:`BF16_FLAGS` present), "amx_tile", "capability" (torch's
    dispatch level, e.g. AVX512), "native_bf16"}``.  Without /proc/cpuinfo (not Linux) nothing is native:
    bf16 autocast then runs emulated, slower than fp32, so ``--precision auto`` keeps fp32.
    """
    info = dict(_cpu_bf16_support(cpuinfo or CPUINFO))
    return {**info, "bf16_flags": list(info["bf16_flags"])}


@functools.lru_cache(maxsize=4)
def _cpu_bf16_support(cpuinfo: Path) -> tuple[tuple[str, Any], ...]:
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's lines
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    found = [f for f in BF16_FLAGS if f in flags]
    return (("model", fields.get("model name") or platform.processor() or "unknown"), ("bf16_flags", tuple(found)),
            ("amx_tile", "amx_tile" in flags), ("capability", torch.backends.cpu.get_cpu_capability()),
            ("native_bf16", bool(found)))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The machine a report's numbers came from, for the report itself: ``{"cpu", "cores", "bf16_flags",
    "capability", "python", "torch", "cuda"}`` (``cuda``: the GPU's name when ``device`` is a CUDA device, else
    None: a GPU the run did not use is not named)."""
    cpu, dev = cpu_bf16_support(), resolve_device(device) if isinstance(device, str) else device
    return {"cpu": cpu["model"], "cores": usable_cores(), "bf16_flags": cpu["bf16_flags"], "capability": cpu["capability"],
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


def machine_text(m: dict[str, Any]) -> str:
    """:func:`machine`'s record as the one line every report prints (the bench's report.md, docs/results.md)."""
    flags = ", ".join(m.get("bf16_flags") or []) or "none"
    gpu = f"GPU {m['cuda']}" if m.get("cuda") else "no GPU"
    return f"{m['cores']} cores of {m['cpu']} (bf16 flags: {flags}), {gpu}, Python {m['python']}, torch {m['torch']}"
