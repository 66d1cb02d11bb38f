"""Training throughput and parameter counts of registered models (models/ §6).

Prints one line per model: images/s for forward + backward + SGD step at ``--batch`` × 64×64, 11 classes,
on ``--threads`` CPU threads, its parameter count, and the ratio to ``deeplabv3_tiny`` measured in the same
run (the baseline; target ≥ 200 images/s for the ``*_tiny`` models).  Then, unless ``--no-params``, the
parameter count of every model in ``models.available()``.

    python benchmarks/models_throughput.py [--threads 2] [--batch 16] [--names NAME ...] [--no-params]
    python benchmarks/models_throughput.py --batch 8 --names segformer_mit_b0 pspnet_resnet18 --steps 3 --repeats 3

Default ``--names``: every ``*_tiny`` model.  On a loaded machine, compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from testbed import models

BASELINE = "deeplabv3_tiny"


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


def param_counts(name: str) -> tuple[int, int, int]:
    """(total parameters, backbone parameters, classifier input channels C) with 11 classes, no aux head."""
    m = models.create(name, 11)
    total = sum(p.numel() for p in m.parameters())
    return total, sum(p.numel() for p in m.backbone.parameters()), m.classifier.in_channels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per model (median and best reported)")
    p.add_argument("--names", nargs="+", help="models to time (default: every *_tiny model)")
    p.add_argument("--no-params", action="store_true", help="skip the parameter counts of every registered model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names or [n for n in models.available() if n.endswith("_tiny")]
    names = [BASELINE] + [n for n in names if n != BASELINE]  # the baseline's own line first
    timing = dict(batch=args.batch, steps=args.steps, repeats=args.repeats)
    baseline = train_throughput(BASELINE, **timing)
    base = baseline[1]
    for name in names:
        best, med = baseline if name == BASELINE else train_throughput(name, **timing)
        target = " target>=200" if name.endswith("_tiny") else ""
        total = param_counts(name)[0]
        print(f"Pm {name}_train_img_per_s ratio={med / base:.2f} median={med:.0f} best={best:.0f}{target} "
              f"params={total / 1e6:.2f}M threads={args.threads} batch={args.batch}", flush=True)
    if not args.no_params:
        for name in models.available():
            total, backbone, c = param_counts(name)
            print(f"  {name}: {total / 1e6:.2f}M parameters (backbone {backbone / 1e6:.2f}M, C={c})", flush=True)


if __name__ == "__main__":
    main()
