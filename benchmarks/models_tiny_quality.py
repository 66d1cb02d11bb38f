"""How well do the tiny models learn 64×64 synthetic scenes in the demo's budget, and carry a line backdoor?

Not a test: a design check for ``models`` (the tiny backbone/head choices).  Trains each model with a plain
loop (AdamW 2e-3, one-cycle, batch 16, h-flip, ``--epochs`` over ``--n-train`` scenes) on 2 threads, with
10% of the training images carrying a 2-px black line at the top whose labels are all turned into class 0
(a whole-image backdoor, like BadNets), then prints benign mIoU, the attack success rate and the wall time.

    python benchmarks/models_tiny_quality.py deeplabv3_tiny danet_tiny --epochs 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from testbed import models
from testbed.data.synth import SYNTH_CLASSES, synth_scenes


def add_line(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, :2] = 0
    return out


def miou(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    m = gt != 255
    cm = np.bincount(gt[m].astype(np.int64) * k + pred[m], minlength=k * k).reshape(k, k)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]) * 100)


def predict(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(images[i : i + 64]).permute(0, 3, 1, 2).float() / 255
            out.append(model(x)["out"].argmax(1).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="+")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    k = len(SYNTH_CLASSES)
    images, labels = synth_scenes(args.n_train + args.n_test, seed=0)
    tr_x, tr_y, te_x, te_y = images[: args.n_train], labels[: args.n_train], images[args.n_train :], labels[args.n_train :]
    rng = np.random.default_rng(0)
    poisoned = rng.choice(args.n_train, int(args.rate * args.n_train), replace=False)
    tr_x, tr_y = tr_x.copy(), tr_y.copy()
    tr_x[poisoned] = add_line(tr_x[poisoned])
    tr_y[poisoned] = np.where(tr_y[poisoned] == 255, 255, 0)
    x_all = torch.from_numpy(tr_x).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(tr_y).long()
    for name in args.names:
        torch.manual_seed(0)
        model = models.create(name, k)
        steps = args.epochs * (args.n_train // 16)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        model.train()
        for _ in range(args.epochs):
            perm = torch.randperm(args.n_train, generator=g)
            for i in range(args.n_train // 16):
                idx = perm[i * 16 : (i + 1) * 16]
                x = x_all[idx].float() / 255
                y = y_all[idx]
                if torch.rand(1, generator=g).item() < 0.5:
                    x, y = x.flip(-1), y.flip(-1)
                loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        train_s = time.perf_counter() - t0
        benign = miou(predict(model, te_x), te_y, k)
        pred_a = predict(model, add_line(te_x))
        m = (te_y != 255) & (te_y != 0)
        asr = float((pred_a[m] == 0).mean() * 100)
        print(
            f"{name}: mIoU-B {benign:.1f}  ASR {asr:.1f}  train {train_s:.0f}s "
            f"({args.epochs * (args.n_train // 16) * 16 / train_s:.0f} img/s, loss {loss.item():.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
