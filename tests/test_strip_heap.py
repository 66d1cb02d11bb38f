"""STRIP's and SCALE-UP's scorers run their forward passes under testbed.training.heap.all_on_heap on CPU: blocks
of every size (STRIP's 100-overlay batches exceed glibc's largest mmap threshold) come from the C heap and are
reused, so a pass no longer maps and faults in fresh pages; the batches are the same, so are the scores.

The comparison runs in a fresh interpreter: the glibc settings are the process's once made, so only a new process
shows the allocator's defaults for the "off" side (run first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from testbed.defense import DefenseContext
from testbed.defenses.scale_up import ScaleUp, ScaleUpScorer
from testbed.defenses.strip import Strip, StripScorer
from testbed.training import heap

ROOT = Path(__file__).resolve().parents[1]
GLIBC = heap._glibc() is not None

SIDES = """
    import contextlib, resource, numpy as np, torch
    from testbed import models
    from testbed.defense import DefenseContext
    from testbed.defenses.strip import Strip
    from testbed.training import heap as heap_mod

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.create("deeplabv3plus_tiny", 3).eval()
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ctx = DefenseContext(clean, np.zeros((4, 64, 64), np.uint8), ("a", "b", "c"), torch.device("cpu"), seed=1,
                         image_size=(64, 64))
    strip = Strip(n_overlays=100, batch_size=200)  # 2 images (200 overlays) a pass: its stem's output is 52 MB

    def side():
        res = strip.run(model, ctx)
        with res.input_scores.heap():  # two calls under one heap: the second reuses the first's blocks
            first = res.input_scores(images)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            again = res.input_scores(images)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        assert first.tobytes() == again.tobytes()
        clean_scores = np.asarray(res.details["clean_scores"]).tobytes().hex()
        return clean_scores, repr(res.threshold), first.tobytes().hex(), faults

    held = heap_mod.all_on_heap  # what the scorers' all_on_heap_on_cpu calls
    heap_mod.all_on_heap = lambda enabled=True: contextlib.nullcontext()
    off = side()
    heap_mod.all_on_heap = held
    on = side()
    print(*off, *on)
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's; elsewhere all_on_heap does nothing")
def test_strip_same_scores_without_faulting_each_pass():
    """deeplabv3plus_tiny at 64×64 with 200 overlays a pass (tensors over glibc's 32 MiB mmap threshold): the clean
    scores, the threshold and the test scores are byte-identical with the heap settings and without (glibc's
    defaults), and a second call faults in a small share of the pages it faults in with the defaults."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SIDES)], cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_"))},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    off, on = words[:4], words[4:]
    assert off[:3] == on[:3]  # clean scores, threshold, test scores
    faults_off, faults_on = int(off[3]), int(on[3])
    assert faults_off > 10_000, faults_off  # the defaults map the big blocks afresh each pass
    assert faults_on < faults_off / 5, (faults_on, faults_off)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def _recorder(monkeypatch) -> list[tuple[bool, int]]:
    """Replace ``heap.all_on_heap`` (which the scorers reach through ``all_on_heap_on_cpu``) by the real one that
    also records (enabled, nesting depth on entry)."""
    seen, real = [], heap.all_on_heap

    def record(enabled=True):
        seen.append((enabled, heap._all_on_heap_depth))
        return real(enabled)

    monkeypatch.setattr(heap, "all_on_heap", record)
    return seen


def _ctx(n: int = 4) -> DefenseContext:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return DefenseContext(images, np.zeros((n, 8, 8), np.uint8), ("a", "b"), torch.device("cpu"), image_size=(8, 8))


def test_strip_enters_the_heap_on_cpu_once_for_its_clean_scores(monkeypatch):
    seen = _recorder(monkeypatch)
    ctx = _ctx()
    res = Strip(n_overlays=4, batch_size=8).run(_Tiny(), ctx)  # 2 images a call: two calls for the clean scores
    assert seen == [(True, 0), (True, 1), (True, 1)]  # run holds it; the calls nest inside (no trim between)
    seen.clear()
    res.input_scores(ctx.clean_images)
    assert seen == [(True, 0)]  # a test-time call holds its own
    assert heap._all_on_heap_depth == 0
    seen.clear()
    StripScorer.heap(SimpleNamespace(device=torch.device("meta")))  # off the CPU: disabled
    assert seen == [(False, 0)]


def test_scale_up_enters_the_heap_on_cpu(monkeypatch):
    seen = _recorder(monkeypatch)
    ctx = _ctx()
    res = ScaleUp(batch_size=12).run(_Tiny(), ctx)  # 2 images a call
    assert seen == [(True, 0), (True, 1), (True, 1)]
    seen.clear()
    res.input_scores(ctx.clean_images)
    assert seen == [(True, 0)]
    seen.clear()
    ScaleUpScorer.heap(SimpleNamespace(device=torch.device("meta")))
    assert seen == [(False, 0)]


def test_all_on_heap_sets_nests_and_restores(fake_glibc):
    """The outermost use sets the kept heap and M_MMAP_MAX = 0 and restores both on the way out (error or not);
    nested and disabled uses call nothing."""
    calls = fake_glibc
    with heap.all_on_heap(False):
        pass
    assert calls == []
    with pytest.raises(KeyError):
        with heap.all_on_heap():
            assert calls == [(heap.M_TRIM_THRESHOLD, 1 << 30), (heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_MMAP_MAX, 0)]
            with heap.all_on_heap(), heap.all_on_heap(False):
                pass
            assert len(calls) == 3  # the nested ones neither set nor restore
            raise KeyError("x")
    assert calls[3:] == [(heap.M_MMAP_MAX, 65536), (heap.M_TRIM_THRESHOLD, 64 << 20), (heap.M_MMAP_THRESHOLD, 32 << 20),
                         ("trim", 0)]
    assert heap._all_on_heap_depth == 0


@pytest.mark.parametrize("device, on", [("cpu", True), ("cpu:0", True), (torch.device("cpu"), True),
                                        ("cuda", False), ("cuda:0", False), (torch.device("cuda", 0), False),
                                        (torch.device("meta"), False)])
def test_all_on_heap_on_cpu_is_enabled_on_the_cpu_only(monkeypatch, device, on):
    seen = _recorder(monkeypatch)
    with heap.all_on_heap_on_cpu(device):
        pass
    assert seen == [(on, 0)]
