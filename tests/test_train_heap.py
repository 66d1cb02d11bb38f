"""The trainer keeps the C heap's freed memory while it trains (testbed.training.heap): no page faults per step,
the same weights.

Both checks run in a fresh interpreter: the glibc settings are the process's once made, so only a new process
shows the allocator's defaults for the "before" side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from testbed.training import heap

ROOT = Path(__file__).resolve().parents[1]
GLIBC = heap._glibc() is not None


def _run(code: str, tmp_path: Path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads, same float reductions
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's; elsewhere kept_heap does nothing")
def test_freed_blocks_stay_mapped_instead_of_faulting_in_again(tmp_path):
    """128 blocks of 256 KiB (32 MiB) allocated, written and freed twice.  With glibc's documented defaults
    fixed (trim and mmap thresholds 128 KiB; adaptive ones depend on the process's history) every cycle faults its
    8,192 pages in again; with the kept heap only the first cycle maps them."""
    faults_before, faults_after, took = _run("""
        import resource, torch
        from testbed.training import heap

        def cycles(n):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):
                blocks = [torch.ones(65536) for _ in range(128)]  # 256 KiB each, every page written
                del blocks
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

        libc = heap._glibc()
        libc.mallopt(heap.M_TRIM_THRESHOLD, 128 * 1024)
        libc.mallopt(heap.M_MMAP_THRESHOLD, 128 * 1024)
        cycles(1)  # torch's own first-call allocations
        before = cycles(2)
        took = heap.keep_freed_memory()
        cycles(1)  # the heap grows once to the working set
        print(before, cycles(2), took)
    """, tmp_path)
    assert took == "True"
    pages_per_cycle = 128 * 256 * 1024 // 4096
    assert int(faults_before) > 1.5 * pages_per_cycle, faults_before  # the defaults do trim and refault
    assert int(faults_after) < pages_per_cycle // 4, faults_after  # not a quarter of one cycle's worth after


def test_kept_heap_gives_the_same_weights(tmp_path):
    """A tiny fp32 run with the allocator's defaults (kept_heap off, first in a fresh process) and one with the
    kept heap: byte-identical model.safetensors."""
    a, b = _run(f"""
        import contextlib, hashlib, torch
        from testbed.data.synth import make_synth_dataset
        from testbed.training import loop
        from testbed.training.loop import TrainConfig, train

        data = make_synth_dataset({str(tmp_path / 'd.h5')!r}, n_train=24, n_test=8, size=32, seed=3)
        cfg = TrainConfig(model="deeplabv3_tiny", epochs=1, batch_size=8, seed=0, device="cpu", precision="fp32")
        kept = loop.kept_heap
        loop.kept_heap = lambda enabled: contextlib.nullcontext()
        runs = [train(data, {str(tmp_path)!r} + "/off", cfg, progress=False, score=False)]
        loop.kept_heap = kept
        runs.append(train(data, {str(tmp_path)!r} + "/on", cfg, progress=False, score=False))
        for r in runs:
            print(hashlib.sha256((r / "model.safetensors").read_bytes()).hexdigest())
    """, tmp_path)
    assert a == b


def test_kept_heap_off_does_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(heap, "give_back", lambda: calls.append("back"))
    with heap.kept_heap(False):
        pass
    assert calls == []
    with pytest.raises(KeyError):
        with heap.kept_heap(True):
            raise KeyError("x")
    assert calls == ["keep", "back"]  # given back on the way out, error or not


def test_after_a_run_the_trim_threshold_comes_down(fake_glibc):
    """glibc cannot restore its adaptive settings, so after the run kept_heap sets the trim threshold to
    AFTER_TRIM_THRESHOLD (64 MiB) before trimming: a process that goes on (a bench worker after a retrain) does
    not keep the run's 1 GiB threshold.  (Whether freed memory really returns also depends on what lies above it
    in the heap, so the calls are checked, not the resident size.)"""
    calls = fake_glibc
    with heap.kept_heap():
        assert calls == [(heap.M_TRIM_THRESHOLD, 1 << 30), (heap.M_MMAP_THRESHOLD, 32 << 20)]
    assert calls[2:] == [(heap.M_TRIM_THRESHOLD, 64 << 20), (heap.M_MMAP_THRESHOLD, 32 << 20), ("trim", 0)]
