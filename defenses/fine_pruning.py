"""Fine-Pruning (Liu et al., 2018) adapted to segmentation.

Backdoor behaviour tends to live in channels that stay dormant on clean data.  Here the pruned layer is the
input of the final 1×1 classifier (the "classifier features"): channels are ranked by their mean activation
on the trusted clean subset and the least active are cut (their columns of ``model.classifier.weight`` are
zeroed) in ``step`` increments while the clean mIoU stays within ``max_drop`` (relative) of the start.  The
pruned model is then fine-tuned on the clean subset, keeping the pruned columns at zero.

BatchNorm while fine-tuning: training mode, BatchNorm on batch statistics (and updating its running statistics),
as BackdoorBench's port does (``defense/fp.py`` calls ``last_net.train()`` before fine-tuning with
``BackdoorModelTrainer``, whose ``ModelTrainerCLS_v2.one_forward_backward`` calls ``self.model.train()`` before
every batch) — ``bn="train"``, the default (revision 2); ``bn="frozen"`` keeps the statistics fixed (eval-mode
BN), fine-pruning's behaviour before revision 2.  A batch of one image keeps BN frozen (train-mode BN needs more
than one value per channel, and ASPP's pooled branch has one); see :func:`testbed.defenses._repair.bn_mode`,
shared with ft and nad.  Pruning and channel ranking run in eval mode (BackdoorBench: ``netC.eval()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from testbed.defenses._features import (check, classifier_features, clean_miou, cross_entropy, is_num, report,
                                        to_input)
from testbed.defenses._repair import SGDPlan, begin, bn_mode, bn_used, check_bn, check_sgd, train_clean
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


@dataclass(eq=False)
class FinePruning:
    """Prune dormant classifier-input channels, then fine-tune on the clean subset.

    Parameters: ``step`` (fraction pruned per step, 1%), ``max_drop`` (allowed relative clean-mIoU drop,
    0.10), ``max_fraction`` (never prune more than this, 0.95), ``epochs``/``lr``/``batch_size``/``momentum``/
    ``weight_decay`` for the SGD fine-tuning (5, 0.01, 8, 0.9, 0), ``ranking`` ("mean" | "max": how channels
    are ranked from least to most active, see ``channel_activation``), ``bn`` ("train": BatchNorm in training
    mode while fine-tuning, as BackdoorBench's ``fp.py``; "frozen": statistics fixed).
    """

    name = "fine-pruning"
    # 2: fine-tuning with BatchNorm in training mode, as BackdoorBench's fp.py (was: frozen BN; a bench's pairs of
    # revision 1 are run again)
    revision = 2
    paper = 'Liu, Dolan-Gavitt & Garg: Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks, RAID 2018'
    reference = 'implemented from the paper; github.com/SCLBD/BackdoorBench defense/fp.py read for its fine-tuning (BatchNorm mode)'
    uses_training_set = False
    params_doc = {
        "step": "share of the classifier-input channels pruned per step",
        "max_drop": "stop pruning before clean mIoU falls below (1 - max_drop) x its start",
        "max_fraction": "never prune more than this share of the channels",
        "epochs": "fine-tuning epochs on the clean subset (SGD)",
        "lr": "fine-tuning learning rate",
        "batch_size": "fine-tuning batch size",
        "momentum": "fine-tuning SGD momentum",
        "weight_decay": "fine-tuning SGD weight decay",
        "ranking": '"mean": channel activation over all positions (Liu et al.); "max": per-image max over positions',
        "bn": "BatchNorm while fine-tuning: train (batch statistics, as BackdoorBench's fp.py) or frozen",
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``); checked in check_params
    step: float = 0.01
    max_drop: float = 0.10
    max_fraction: float = 0.95
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 8
    momentum: float = 0.9
    weight_decay: float = 0.0
    ranking: str = "mean"
    bn: str = "train"

    def check_params(self) -> None:
        check(is_num(self.step) and 0 < self.step <= 1, "step", "a number in (0, 1]", self.step)
        check(is_num(self.max_drop) and 0 <= self.max_drop < 1, "max_drop", "a number in [0, 1)", self.max_drop)
        check(is_num(self.max_fraction) and 0 <= self.max_fraction <= 1, "max_fraction", "a number in [0, 1]",
              self.max_fraction)
        check_sgd(self)
        check(self.ranking in RANKINGS, "ranking", f"one of {', '.join(RANKINGS)}", self.ranking)
        check_bn(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        first = begin(self, model, ctx)
        model, meter, budget, start = first.model, first.meter, first.budget, first.miou
        n = len(ctx.clean_images)
        activation = channel_activation(model, ctx.clean_images, ctx.device, ranking=self.ranking)
        meter.forward += n
        order = np.argsort(activation, kind="stable")  # least active first; ties by channel index
        curve, kept, stopped_by_budget = self._prune_curve(model, ctx, order, start, first)
        pruned = sorted(int(c) for c in order[:kept])
        prune_channels(model, pruned)
        pruned_miou = curve[[p["pruned"] for p in curve].index(kept)]["miou_clean"]

        epochs_done = 0
        if self.epochs > 0 and not stopped_by_budget:
            plan = SGDPlan(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay, "constant",
                           "fine-tuning", (0.5, 1.0))
            ce = lambda m, x, y: (cross_entropy(m(x)["out"], y, ctx.ignore_index), len(x), len(x))  # noqa: E731
            epochs_done, stopped_by_budget = train_clean(model, ctx, plan, bn_mode(self.bn, ce), budget, meter,
                                                         after_step=lambda: prune_channels(model, pruned))
        final = self._miou(model, ctx, meter)
        report(ctx.progress, 1.0, f"fine-pruning done: {kept} channels pruned, clean mIoU {final:.3f}")
        details = {
            "curve": curve,
            "pruned_channels": pruned,
            "prune_order": [int(c) for c in order],  # the runner scores each curve point on the test sets
            "pruned_fraction": kept / len(order),
            "channels": len(order),
            "miou_clean_start": start,
            "miou_clean_pruned": pruned_miou,
            "miou_clean_final": final,
            "miou_floor": (1.0 - self.max_drop) * start,
            "fine_tune_epochs": epochs_done,
            "ranking": self.ranking,
            "bn": self.bn,
            "bn_used": bn_used(self.bn, self.batch_size, len(ctx.clean_images)),
            **budget.summary(),
        }
        return DefenseResult(model=model, cost=meter.cost(), details=details)

    @staticmethod
    def _miou(model: nn.Module, ctx: DefenseContext, meter) -> float:
        meter.forward += len(ctx.clean_images)
        return clean_miou(model, ctx.clean_images, ctx.clean_labels, ctx.num_classes, ctx.device,
                          ignore_index=ctx.ignore_index)

    def _prune_curve(self, model, ctx, order, start, first) -> tuple[list[dict], int, bool]:
        """Prune the least active channels ``step`` by ``step`` while the clean mIoU stays above the floor; the
        model is left with its original classifier.  Returns (curve, channels kept pruned, stopped by budget)."""
        channels, n, floor = len(order), len(ctx.clean_images), (1.0 - self.max_drop) * start
        curve = [{"fraction": 0.0, "pruned": 0, "miou_clean": start, "accepted": True}]
        kept, stopped_by_budget = 0, False
        steps = int(math.floor(self.max_fraction / self.step + 1e-9))
        original = model.classifier.weight.detach().clone()
        for i in range(1, steps + 1):
            count = min(channels - 1, int(round(i * self.step * channels)))
            if count <= curve[-1]["pruned"]:
                continue  # fewer channels than steps: this fraction rounds to the previous count
            if first.budget.spent(2 * n):  # this step's clean mIoU, and the final one's reserve
                stopped_by_budget = True
                break
            prune_channels(model, order[:count])
            miou = self._miou(model, ctx, first.meter)
            ok = bool(miou >= floor)
            curve.append({"fraction": count / channels, "pruned": count, "miou_clean": miou, "accepted": ok})
            report(ctx.progress, 0.5 * i / steps, f"pruned {count}/{channels} channels, clean mIoU {miou:.3f}")
            if not ok:
                break
            kept = count
        with torch.no_grad():  # settle on the last accepted count
            model.classifier.weight.copy_(original)
        return curve, kept, stopped_by_budget
