"""Training throughput of the tiny models and parameter counts of every registered model (models/ §6).

Prints one line per tiny model: images/s for forward + backward + SGD step at batch 16, 64×64, on
``--threads`` CPU threads (target ≥ 200), then the parameter count of every model in ``models.available()``.

    python benchmarks/models_throughput.py [--threads 2] [--no-params]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from testbed import models


def train_throughput(name: str, batch: int = 16, size: int = 64, steps: int = 10, repeats: int = 5) -> tuple[float, float]:
    """(best, median) images/s of SGD training steps on random data."""
    torch.manual_seed(0)
    model = models.create(name, 11).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 11, (batch, size, size))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)["out"], y, ignore_index=255).backward()
        opt.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t))
    return max(rates), statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-params", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in [n for n in models.available() if n.endswith("_tiny")]:
        best, med = train_throughput(name)
        print(f"Pm {name}_train_img_per_s median={med:.0f} best={best:.0f} target>=200 threads={args.threads}", flush=True)
    if not args.no_params:
        for name in models.available():
            m = models.create(name, 11)
            total = sum(p.numel() for p in m.parameters())
            bb = sum(p.numel() for p in m.backbone.parameters())
            print(f"  {name}: {total / 1e6:.2f}M parameters (backbone {bb / 1e6:.2f}M)", flush=True)


if __name__ == "__main__":
    main()
