"""Keeping the C heap's freed memory in the process while a CPU run trains (glibc's malloc).

Why: PyTorch's CPU tensors come from ``malloc``.  Every training step frees its activations and gradients
and allocates the same sizes again the next step; with glibc's defaults the free memory at the top of the
heap is handed back to the kernel after each step (trimming) and every page of it faults in again, zeroed,
on the next.  Measured with one thread (BENCHMARKS.md, "The trainer's page faults"): deeplabv3_tiny, 64×64,
batch 16: ≈3,100 minor page faults per step and ≈10% of the trainer's CPU time in the kernel, most of the gap
to a bare PyTorch loop (which, by the luck of its heap layout, faulted ≈20× less); deeplabv3plus_tiny, 96×96,
batch 8 (the CamVid zoo's model and scale): ≈4,800 faults per step, ≈10% in the kernel.  With the settings
below the latter faults ≈270 pages per step (the heap grows once per run) and spends ≈1% in the kernel.

Two ``mallopt`` settings stop it: keep up to :data:`TRIM_THRESHOLD` bytes of free memory at the heap's top
instead of trimming it, and take blocks up to :data:`MMAP_THRESHOLD` (glibc's largest) from the heap instead
of a fresh ``mmap`` each time.  Bounded: what stays mapped is memory the run itself held at its peak (at most
:data:`TRIM_THRESHOLD` of it free at the heap's top), and :func:`kept_heap` gives the free memory back
(``malloc_trim``) when the run ends; blocks over :data:`MMAP_THRESHOLD` are still mapped and unmapped each
time.  glibc cannot read its adaptive settings back to restore them, so after the run the trim threshold is
set to :data:`AFTER_TRIM_THRESHOLD` (64 MiB, the most glibc's own adaptation ever reaches): a process that
trains and then goes on (a bench worker after a retrain, `testbed defend`, a test session) trims its heap's top
again once more than that is free there, not only past the run's 1 GiB (memory below a block still in use stays
mapped, as with glibc's defaults).  Where a block lies never changes what is computed (PyTorch aligns every tensor to
64 bytes either way): the weights stay byte-identical (tests/test_train_heap.py).
Elsewhere than glibc (macOS, musl) this does nothing.

:func:`all_on_heap` goes one step further for code whose blocks exceed :data:`MMAP_THRESHOLD` (an input filter's
batch of 100 overlays per image: STRIP's activations reach ≈150 MiB a tensor at CamVid's 96×128): no block is
mmap'd at all (``M_MMAP_MAX`` = 0), so those too come from the heap and are reused, unfaulted, by the next pass.
Measured on STRIP with the CamVid zoo's model, one thread (BENCHMARKS.md): 75.2 M minor page faults → 4.2 M,
269 → 154 CPU-s, scores byte-identical (the batches are the same; only where the blocks lie changes).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Iterator

import torch

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # free bytes at the heap's top kept mapped (glibc's default: 128 KiB, adaptive)
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value)
AFTER_TRIM_THRESHOLD = 64 << 20  # after a run: glibc's adaptive maximum (2 x its largest mmap threshold)
DEFAULT_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX (blocks mmap'd at once), restored after all_on_heap
_all_on_heap_depth = 0  # nesting of all_on_heap: only the outermost one sets and restores


def _glibc():
    """The C library when it is glibc (the only one whose ``mallopt`` numbers these are), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory(trim: int = TRIM_THRESHOLD) -> bool:
    """Set the two thresholds for this process (``trim``: free bytes kept at the heap's top); True when glibc
    took both."""
    libc = _glibc()
    if libc is None:
        return False
    took = [libc.mallopt(M_TRIM_THRESHOLD, trim), libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)]
    return all(took)


def give_back() -> None:
    """Lower the trim threshold to :data:`AFTER_TRIM_THRESHOLD` and return the heap's free memory to the
    kernel now (``malloc_trim(0)``)."""
    libc = _glibc()
    if libc is not None:
        keep_freed_memory(AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def kept_heap(enabled: bool = True) -> Iterator[None]:
    """While the block runs, freed memory stays in the process (:func:`keep_freed_memory`); after, it is given back."""
    if not enabled:
        yield
        return
    keep_freed_memory()
    try:
        yield
    finally:
        give_back()


def all_on_heap_on_cpu(device: str | torch.device) -> contextlib.AbstractContextManager:
    """:func:`all_on_heap` where ``device`` (a torch device or its name) is the CPU; nothing on another device
    (the input filters' scorers hold it over their forward passes)."""
    return all_on_heap(torch.device(device).type == "cpu")


@contextlib.contextmanager
def all_on_heap(enabled: bool = True) -> Iterator[None]:
    """:func:`kept_heap`, and blocks of every size from the heap too (``M_MMAP_MAX`` = 0): no fresh pages mapped
    and faulted in, zeroed, per large tensor.  Glibc still maps a block when the heap cannot grow.  Nested uses
    share the outermost one (an inner exit neither trims nor restores).  After it, ``M_MMAP_MAX`` is glibc's
    default (:data:`DEFAULT_MMAP_MAX`; a value set through ``GLIBC_TUNABLES`` cannot be read back) and the heap's
    free memory is given back (:func:`give_back`)."""
    global _all_on_heap_depth
    if not enabled:
        yield
        return
    _all_on_heap_depth += 1
    try:
        with _no_mmap() if _all_on_heap_depth == 1 else contextlib.nullcontext():
            yield
    finally:
        _all_on_heap_depth -= 1


@contextlib.contextmanager
def _no_mmap() -> Iterator[None]:
    """The outermost :func:`all_on_heap`: the kept heap with ``M_MMAP_MAX`` = 0 while the block runs."""
    libc = _glibc()
    with kept_heap():
        took = libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0))
        try:
            yield
        finally:
            if took:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
