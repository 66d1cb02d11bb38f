"""P3: the trainer's images/s ÷ a bare PyTorch loop on the same model, data, optimizer and batch size.

The trainer is timed as a whole (``train()`` wall clock with scoring off: data open + content hash, model
build, HDF5 loading through the DataLoader, flips, NaN checks, per-epoch checkpoints and the final save),
the bare loop as the minimum a training step needs (uint8 tensors already in memory, a seeded
permutation, float conversion, forward, loss, backward, step).  Both run alternately in this process with
the same thread count; the best of ``--repeats`` rounds of each is compared.

    .venv/bin/python benchmarks/p3_train.py [--images 1000] [--epochs 2] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TARGET = 0.95


def bare_loop(model_name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
              batch_size: int, lr: float, seed: int) -> float:
    """images/s of the plainest correct loop: same model + optimizer + batch size, data in memory."""
    from testbed import models

    torch.manual_seed(seed)
    model = models.create(model_name, num_classes)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    steps = n // batch_size
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x = images[idx].permute(0, 3, 1, 2).float().div_(255).contiguous()
            y = labels[idx].long()
            loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epochs * steps * batch_size / (time.perf_counter() - t0)


def trainer(data: Path, out: Path, model_name: str, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[float, float]:
    """(images/s over the whole train() call, images/s over the epochs alone as logged)."""
    from testbed.train import TrainConfig, train

    cfg = TrainConfig(model=model_name, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device="cpu")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train(data, out, cfg, progress=False, score=False)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    images = sum(r["images"] for r in log)
    return images / wall, images / sum(r["seconds"] for r in log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv3_tiny")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from testbed import h5data
    from testbed.synth import make_synth_dataset

    tmp = Path(tempfile.mkdtemp(prefix="p3-"))
    try:
        data = make_synth_dataset(tmp / "synth.h5", n_train=args.images, n_test=16, size=args.size, seed=0)
        with h5data.open_dataset(data) as f:
            images, labels = torch.from_numpy(f["train/images"]), torch.from_numpy(f["train/labels"])
            k = f.num_classes
        lr = 2e-3
        ours, bare, ours_epochs = [], [], []
        for _ in range(args.repeats):
            wall, epochs_only = trainer(data, tmp / "run", args.model, args.epochs, args.batch_size, lr, 0)
            ours.append(wall)
            ours_epochs.append(epochs_only)
            bare.append(bare_loop(args.model, images, labels, k, args.epochs, args.batch_size, lr, 0))
        ratio = max(ours) / max(bare)
        print(f"P3 trainer_vs_bare_loop ratio={ratio:.2f} target>={TARGET}")
        print(f"  model={args.model} images={args.images} size={args.size} epochs={args.epochs} "
              f"batch={args.batch_size} threads={args.threads} repeats={args.repeats}")
        print(f"  trainer (whole train() call, scoring off) img/s: {', '.join(f'{x:.1f}' for x in ours)}")
        print(f"  trainer (epoch loops only, as logged)      img/s: {', '.join(f'{x:.1f}' for x in ours_epochs)}")
        print(f"  bare loop                                  img/s: {', '.join(f'{x:.1f}' for x in bare)}")
        print(f"  epoch-loop ratio={max(ours_epochs) / max(bare):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
