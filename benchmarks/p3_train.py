"""P3: the trainer's images/s ÷ a bare PyTorch loop on the same model, data, optimizer and batch size.

The trainer is timed as a whole (``train()`` wall clock with scoring off: data open + content hash, model
build, HDF5 loading through the DataLoader, flips, NaN checks, per-epoch checkpoints and the final save),
the bare loop as the minimum a training step needs (uint8 tensors already in memory, a seeded
permutation, float conversion, forward, loss, backward, step) with the trainer's own optimizer
(:func:`testbed.training.loop.make_optimizer`: fused AdamW) and the trainer's arithmetic path (what
``--precision auto`` picks on this CPU: bf16 autocast where the CPU has native bf16), so the ratio is the
trainer's overhead and nothing else.
Both run alternately in this process with the same thread count, ``--rounds`` rounds (the order alternates
between rounds); the ratio is the median over rounds of trainer ÷ bare loop within a round, printed with its
spread.  Both sides work under the same C-heap settings: the first ``train()`` call sets them for the process
(:mod:`testbed.training.heap`: freed memory stays mapped, no page faults per step).  Before it did, glibc's
adaptive defaults made the trainer fault ≈3,100 pages in per step at the default sizes and the bare loop, by the
luck of its heap layout, ≈100: that was most of the gap (BENCHMARKS.md, "The trainer's page faults").

    .venv/bin/python benchmarks/p3_train.py [--images 480] [--epochs 2] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's testbed, not an installed one

TARGET = 0.95


def bare_loop(cfg, images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
              seed: int = 0) -> tuple[float, float, float]:
    """(images/s, images per CPU-second, minor page faults per step) of the plainest correct loop: ``cfg``'s
    model, optimizer, batch size and precision (a :class:`TrainConfig`), data in memory."""
    from testbed import models
    from testbed.training.loop import make_optimizer, resolve_precision

    torch.manual_seed(seed)
    model = models.create(cfg.model, num_classes)
    model.train()
    batch_size = cfg.batch_size
    prec = resolve_precision(cfg, torch.device("cpu"))  # the trainer's own path: bf16 autocast where it picks it
    memory_format = torch.channels_last if prec.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    opt = make_optimizer(model.parameters(), cfg)
    n = images.shape[0]
    steps = n // batch_size
    g = torch.Generator().manual_seed(seed)
    t0, c0, f0 = time.perf_counter(), time.process_time(), _faults()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x = images[idx].permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=memory_format)
            y = labels[idx].long()
            with torch.autocast("cpu", dtype=prec.dtype, enabled=prec.amp):
                loss = F.cross_entropy(model(x)["out"].float(), y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    images = epochs * steps * batch_size
    return images / (time.perf_counter() - t0), images / (time.process_time() - c0), (_faults() - f0) / (epochs * steps)


def trainer(data: Path, out: Path, model_name: str, epochs: int, batch_size: int, lr: float,
            seed: int) -> tuple[float, float, float, float]:
    """(images/s over the whole train() call, images/s over the epochs alone as logged, images per CPU-second
    of the whole call, minor page faults per step of the whole call)."""
    from testbed.training.loop import TrainConfig, train

    cfg = TrainConfig(model=model_name, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device="cpu")
    shutil.rmtree(out, ignore_errors=True)
    t0, c0, f0 = time.perf_counter(), time.process_time(), _faults()
    train(data, out, cfg, progress=False, score=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    images = sum(r["images"] for r in log)
    faults = (_faults() - f0) / sum(r["steps"] for r in log)
    return images / wall, images / sum(r["seconds"] for r in log), images / cpu, faults


def _faults() -> int:
    """This process's minor page faults so far: pages the kernel mapped in, each zeroed in kernel time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv3_tiny")
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(images=32, size=32, epochs=1, batch_size=8, rounds=1)
    torch.set_num_threads(args.threads)

    from testbed.data import h5data
    from testbed.data.synth import make_synth_dataset

    tmp = Path(tempfile.mkdtemp(prefix="p3-"))
    try:
        data = make_synth_dataset(tmp / "synth.h5", n_train=args.images, n_test=16, size=args.size, seed=0)
        with h5data.open_dataset(data) as f:
            images, labels = torch.from_numpy(f["train/images"]), torch.from_numpy(f["train/labels"])
            k = f.num_classes
        lr = 2e-3
        from testbed.training.loop import TrainConfig

        bare_cfg = TrainConfig(model=args.model, batch_size=args.batch_size, lr=lr, weight_decay=1e-4, device="cpu")

        def run_trainer() -> tuple[float, float, float, float]:
            return trainer(data, tmp / "run", args.model, args.epochs, args.batch_size, lr, 0)

        def run_bare() -> tuple[float, float, float]:
            return bare_loop(bare_cfg, images, labels, k, args.epochs)

        # warm-up: kernels' first calls and the trainer's imports are not what either side is timed for
        bare_loop(bare_cfg, images[: 4 * args.batch_size], labels[: 4 * args.batch_size], k, 1)
        import safetensors.torch  # noqa: F401
        import testbed.training.runs  # noqa: F401
        trained, bare = [], []
        for r in range(args.rounds):  # alternate who goes first, so a slow drift does not favour one side
            if r % 2:
                bare.append(run_bare())
            trained.append(run_trainer())
            if not r % 2:
                bare.append(run_bare())
        ours, ours_epochs, ours_cpu, ours_faults = zip(*trained)
        bare, bare_cpu, bare_faults = zip(*bare)
        ratios = [a / b for a, b in zip(ours, bare)]
        epoch_ratios = [a / b for a, b in zip(ours_epochs, bare)]
        cpu_ratios = [a / b for a, b in zip(ours_cpu, bare_cpu)]
        ratio = statistics.median(ratios)
        print(f"P3 trainer_vs_bare_loop ratio={ratio:.2f} target>={TARGET}")
        print(f"  model={args.model} images={args.images} size={args.size} epochs={args.epochs} "
              f"batch={args.batch_size} threads={args.threads} rounds={args.rounds}")
        from testbed.training.loop import resolve_precision

        prec = resolve_precision(TrainConfig(model=args.model, device="cpu"), torch.device("cpu"))
        print(f"  path (both sides): {prec.name}, {'channels_last' if prec.channels_last else 'contiguous'} ({prec.reason})")
        print(f"  ratio per round: {', '.join(f'{x:.3f}' for x in ratios)}  (median {ratio:.3f}, "
              f"spread {min(ratios):.3f}-{max(ratios):.3f})")
        print(f"  trainer (whole train() call, scoring off) img/s: {', '.join(f'{x:.1f}' for x in ours)}")
        print(f"  trainer (epoch loops only, as logged)      img/s: {', '.join(f'{x:.1f}' for x in ours_epochs)}")
        print(f"  bare loop                                  img/s: {', '.join(f'{x:.1f}' for x in bare)}")
        print(f"  epoch-loop ratio median={statistics.median(epoch_ratios):.3f}; per CPU-second (whole call, robust to "
              f"other load with 1 thread) median={statistics.median(cpu_ratios):.3f} "
              f"(spread {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
        print(f"  minor page faults per step: trainer {', '.join(f'{x:.0f}' for x in ours_faults)}; "
              f"bare loop {', '.join(f'{x:.0f}' for x in bare_faults)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
