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
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Iterator

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # free bytes at the heap's top kept mapped (glibc's default: 128 KiB, adaptive)
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value)
AFTER_TRIM_THRESHOLD = 64 << 20  # after a run: glibc's adaptive maximum (2 x its largest mmap threshold)


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
