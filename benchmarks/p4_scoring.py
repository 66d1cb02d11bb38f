"""P4: scorer throughput vs torchmetrics on the same predictions, side by side in one run.

Run: `.venv/bin/python benchmarks/p4_scoring.py [--n 2000] [--size 64] [--classes 12] [--device cpu]`.
Both consume identical int64 prediction/target batches (32 images of 64×64, K=12, ~5% ignore pixels,
one class absent so the nanmean convention is exercised): ours = `testbed.scoring.metrics.ConfusionMatrix`
(one bincount per batch), theirs = torchmetrics `MulticlassJaccardIndex(average="macro")` +
`MulticlassAccuracy(average="micro")`, both with ignore_index=255, updated per batch.  Best of --repeat.
"""

from __future__ import annotations

import argparse
import time

import torch


def _data(n: int, size: int, k: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k - 1, (n, size, size), generator=g)  # class k-1 never in the targets
    pred = torch.where(torch.rand(n, size, size, generator=g) < 0.6, target,
                       torch.randint(0, k - 1, (n, size, size), generator=g))  # ... nor in the predictions
    target[torch.rand(n, size, size, generator=g) < 0.05] = 255
    return pred.to(device), target.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(pred, target, k, bs, device):
    from testbed.scoring.metrics import ConfusionMatrix

    cm = ConfusionMatrix(k, device)
    for s in range(0, len(pred), bs):
        cm.update(pred[s : s + bs], target[s : s + bs])
    return cm.miou(), cm.pixel_accuracy()


def _torchmetrics(pred, target, k, bs, device):
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    jac = MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=255).to(device)
    acc = MulticlassAccuracy(num_classes=k, average="micro", ignore_index=255).to(device)
    for s in range(0, len(pred), bs):
        jac.update(pred[s : s + bs], target[s : s + bs])
        acc.update(pred[s : s + bs], target[s : s + bs])
    return float(jac.compute()), float(acc.compute())


def _time(fn, *args, repeat: int, device):
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    a = ap.parse_args(argv)
    if a.smoke:
        vars(a).update(n=32, size=32, repeat=1)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    pred, target = _data(a.n, a.size, a.classes, 0, device)
    args = (pred, target, a.classes, a.batch_size, device)
    _ours(*args), _torchmetrics(*args)  # warm-up (lazy imports, kernels)
    t_ours, (miou, pa) = _time(_ours, *args, repeat=a.repeat, device=device)
    t_tm, (miou_tm, pa_tm) = _time(_torchmetrics, *args, repeat=a.repeat, device=device)
    diff = max(abs(miou - miou_tm), abs(pa - pa_tm))
    ratio = t_tm / t_ours
    print(f"P4 scorer_vs_torchmetrics ratio={ratio:.2f} target>=2")
    print(f"  data: {a.n} x {a.size}x{a.size} predictions, K={a.classes} (one class absent), ~5% ignore, "
          f"batches of {a.batch_size}, device={device}, threads={a.threads}, best of {a.repeat}")
    print(f"  ours (ConfusionMatrix, one bincount/batch): {t_ours * 1e3:.1f} ms  ({a.n / t_ours:,.0f} images/s)")
    print(f"  torchmetrics (JaccardIndex macro + Accuracy micro): {t_tm * 1e3:.1f} ms  ({a.n / t_tm:,.0f} images/s)")
    print(f"  mIoU ours={miou:.8f} torchmetrics={miou_tm:.8f}; PA ours={pa:.8f} torchmetrics={pa_tm:.8f}")
    print(f"  values equal: {diff < 1e-6} (max abs diff {diff:.2e})")


if __name__ == "__main__":
    main()
