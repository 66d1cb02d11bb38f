"""Fine-Pruning (Liu et al., 2018) adapted to segmentation.

Backdoor behaviour tends to live in channels that stay dormant on clean data.  Here the pruned layer is the
input of the final 1×1 classifier (the "classifier features"): channels are ranked by their mean activation
on the trusted clean subset and the least active are cut (their columns of ``model.classifier.weight`` are
zeroed) in ``step`` increments while the clean mIoU stays within ``max_drop`` (relative) of the start.  The
pruned model is then fine-tuned on the clean subset, keeping the pruned columns at zero.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from testbed.defenses._features import Budget, CostMeter, classifier_features, clean_miou, cross_entropy, report, to_input
from testbed.defenses.protocol import DefenseContext, DefenseResult


@torch.no_grad()
def channel_activation(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32,
                       ranking: str = "mean") -> np.ndarray:
    """Activation ``[C]`` of each classifier-input channel on the images, by which channels are ranked.

    ``mean``: the mean over the images and all feature positions (Liu et al.'s rule).  ``max``: per image the
    largest activation over the positions, then the mean over the images — a channel that fires strongly in
    a few rows only (a thin line trigger's footprint) has a small mean but a large max.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    total, count = None, 0
    for s in range(0, len(images), batch_size):
        feats, _ = classifier_features(model, to_input(images[s : s + batch_size], device))
        if ranking == "mean":
            part = feats.double().sum((0, 2, 3))
            count += feats.shape[0] * feats.shape[2] * feats.shape[3]
        else:
            part = feats.double().flatten(2).amax(2).sum(0)
            count += feats.shape[0]
        total = part if total is None else total + part
    return (total / max(count, 1)).cpu().numpy()


RANKINGS = ("mean", "max")


def prune_channels(model: nn.Module, channels) -> None:
    """Cut ``channels`` of the classifier input: zero their input weights in ``model.classifier`` (in place)."""
    idx = torch.as_tensor(list(channels), dtype=torch.long, device=model.classifier.weight.device)
    with torch.no_grad():
        model.classifier.weight[:, idx] = 0


def _freeze_bn(model: nn.Module) -> None:
    """Keep BatchNorm statistics fixed: the clean subset is too small to re-estimate them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FinePruning:
    """Prune dormant classifier-input channels, then fine-tune on the clean subset.

    Parameters: ``step`` (fraction pruned per step, 1%), ``max_drop`` (allowed relative clean-mIoU drop,
    0.10), ``max_fraction`` (never prune more than this, 0.95), ``epochs``/``lr``/``batch_size``/``momentum``/
    ``weight_decay`` for the SGD fine-tuning (5, 0.01, 8, 0.9, 0), ``ranking`` ("mean" | "max": how channels
    are ranked from least to most active, see ``channel_activation``).
    """

    name = "fine-pruning"
    uses_training_set = False
    params_doc = {
        "step": "share of the classifier-input channels pruned per step",
        "max_drop": "stop pruning before clean mIoU falls below (1 - max_drop) x its start",
        "max_fraction": "never prune more than this share of the channels",
        "epochs": "fine-tuning epochs on the clean subset (SGD, BatchNorm frozen)",
        "lr": "fine-tuning learning rate",
        "batch_size": "fine-tuning batch size",
        "momentum": "fine-tuning SGD momentum",
        "weight_decay": "fine-tuning SGD weight decay",
        "ranking": '"mean": channel activation over all positions (Liu et al.); "max": per-image max over positions',
    }

    def __init__(self, step: float = 0.01, max_drop: float = 0.10, max_fraction: float = 0.95, epochs: int = 5,
                 lr: float = 0.01, batch_size: int = 8, momentum: float = 0.9, weight_decay: float = 0.0,
                 ranking: str = "mean") -> None:
        if not 0 < step <= 1:
            raise ValueError(f"step must be in (0, 1], got {step}")
        if not 0 <= max_drop < 1:
            raise ValueError(f"max_drop must be in [0, 1), got {max_drop}")
        self.step, self.max_drop, self.max_fraction = float(step), float(max_drop), float(max_fraction)
        self.epochs, self.lr, self.batch_size = int(epochs), float(lr), int(batch_size)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
        self.ranking = ranking

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        meter, device = CostMeter(), ctx.device
        budget = Budget.for_context(ctx, meter)
        model = copy.deepcopy(model).to(device).eval()
        images, labels, k, n = ctx.clean_images, ctx.clean_labels, ctx.num_classes, len(ctx.clean_images)
        if n == 0:
            raise ValueError("fine-pruning needs a non-empty clean subset")

        activation = channel_activation(model, images, device, ranking=self.ranking)
        meter.forward += n
        order = np.argsort(activation, kind="stable")  # least active first; ties by channel index
        channels = len(order)
        start = clean_miou(model, images, labels, k, device, ignore_index=ctx.ignore_index)
        meter.forward += n
        floor = (1.0 - self.max_drop) * start
        curve = [{"fraction": 0.0, "pruned": 0, "miou_clean": start, "accepted": True}]
        kept, stopped_by_budget = 0, False
        steps = int(math.floor(self.max_fraction / self.step + 1e-9))
        original = model.classifier.weight.detach().clone()
        for i in range(1, steps + 1):
            count = min(channels - 1, int(round(i * self.step * channels)))
            if count <= curve[-1]["pruned"]:
                continue  # fewer channels than steps: this fraction rounds to the previous count
            if budget.spent(2 * n):  # this step's clean mIoU, and the final one's reserve
                stopped_by_budget = True
                break
            prune_channels(model, order[:count])
            miou = clean_miou(model, images, labels, k, device, ignore_index=ctx.ignore_index)
            meter.forward += n
            ok = bool(miou >= floor)
            curve.append({"fraction": count / channels, "pruned": count, "miou_clean": miou, "accepted": ok})
            report(ctx.progress, 0.5 * i / steps, f"pruned {count}/{channels} channels, clean mIoU {miou:.3f}")
            if not ok:
                break
            kept = count
        with torch.no_grad():  # settle on the last accepted count
            model.classifier.weight.copy_(original)
        pruned = sorted(int(c) for c in order[:kept])
        prune_channels(model, pruned)
        pruned_miou = curve[[p["pruned"] for p in curve].index(kept)]["miou_clean"]

        epochs_done = 0
        if self.epochs > 0 and not stopped_by_budget:
            epochs_done, stopped_by_budget = self._fine_tune(model, ctx, pruned, budget, meter)
        final = clean_miou(model, images, labels, k, device, ignore_index=ctx.ignore_index)
        meter.forward += n
        model.eval()
        report(ctx.progress, 1.0, f"fine-pruning done: {kept} channels pruned, clean mIoU {final:.3f}")
        details = {
            "curve": curve,
            "pruned_channels": pruned,
            "prune_order": [int(c) for c in order],  # the runner scores each curve point on the test sets
            "pruned_fraction": kept / channels,
            "channels": channels,
            "miou_clean_start": start,
            "miou_clean_pruned": pruned_miou,
            "miou_clean_final": final,
            "miou_floor": floor,
            "fine_tune_epochs": epochs_done,
            "ranking": self.ranking,
            **budget.summary(),
        }
        return DefenseResult(model=model, cost=meter.cost(), details=details)

    def _fine_tune(self, model, ctx, pruned, budget, meter) -> tuple[int, bool]:
        """SGD on the clean subset (BatchNorm frozen), re-zeroing the pruned columns after every step."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        loader = ctx.clean_loader(batch_size=self.batch_size, shuffle=True)
        done = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # dropout etc. in the model, if any
            for epoch in range(self.epochs):
                model.train()
                _freeze_bn(model)
                for x, y in loader:
                    if budget.spent(2 * len(x) + len(ctx.clean_images)):  # this batch, and the final mIoU's reserve
                        return done, True
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    loss = cross_entropy(model(x)["out"], y, ctx.ignore_index)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    prune_channels(model, pruned)
                    meter.forward += len(x)
                    meter.backward += len(x)
                done = epoch + 1
                report(ctx.progress, 0.5 + 0.5 * done / self.epochs, f"fine-tuning epoch {done}/{self.epochs}")
        return done, False
