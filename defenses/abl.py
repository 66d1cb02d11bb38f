"""Anti-Backdoor Learning (Li et al., NeurIPS 2021) adapted to segmentation: a training-set defense.

Backdoored samples are learned much faster than clean ones.  ABL's isolation stage trains a model on the
(possibly poisoned) training set with local gradient ascent (LGA): a sample's loss ℓ is descended while it is
above ``gamma`` and ascended once it falls below, ``sign(ℓ − γ)·ℓ``, so clean samples cannot sink under γ
while the backdoored ones, learned through an easy shortcut, keep falling.  After ``epochs`` isolation
epochs (the paper's T_te = 20) the ``isolation_ratio`` (1%) of training samples with the lowest loss is
isolated.  Here a sample is an image and its loss is its mean per-pixel cross-entropy (ignored pixels left
out).  The isolated images are returned as ``flagged_train``: the runner retrains without them, beside a
random-removal control of the same size.  With ``unlearn=True`` the defense also returns the suspicious model
after ABL's unlearning stage — gradient ascent on the isolated images for ``unlearn_epochs`` (5) at
``unlearn_lr`` (5e-4) — and the runner then scores that model instead of retraining (docs/defenses.md).
"""

from __future__ import annotations

from dataclasses import dataclass
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import Budget, CostMeter, check, is_int, is_num, report, to_input
from testbed.defenses._repair import batch_trains_bn, set_bn_training
from testbed.defenses.protocol import DefenseContext, DefenseResult

INITS = ("scratch", "model")


def image_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-image mean per-pixel CE: ``logits [B,K,H,W]``, ``labels [B,H,W]`` → ``[B]`` (0 for an image
    whose pixels are all ignored)."""
    pix = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # ignored pixels: 0
    valid = (labels != ignore_index).flatten(1).sum(1).clamp_min(1)
    return pix.flatten(1).sum(1) / valid


def lga_loss(losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent: mean over images of ``sign(ℓ − γ)·ℓ`` (descend above γ, ascend below)."""
    return (torch.sign(losses - gamma) * losses).mean()


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer's parameters drawn afresh (seeded): the same architecture, untrained."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return fresh


@dataclass(eq=False)
class ABL:
    """Parameters (defaults): ``epochs`` (5 on CPU; the paper's T_te is 20), ``gamma`` (0.5, the LGA threshold),
    ``isolation_ratio`` (0.01), ``init`` ("scratch": a freshly initialised copy of the architecture, as ABL
    trains from scratch; "model": start from the suspicious model), ``lr`` (2e-3, AdamW), ``batch_size``
    (16), ``unlearn`` (False), ``unlearn_epochs`` (5), ``unlearn_lr`` (5e-4).  After ``run``, ``losses_`` holds
    every training image's loss under the isolation model (training-set order), from which the isolated share
    is the lowest."""

    name = "abl"
    paper = 'Li et al.: Anti-Backdoor Learning: Training Clean Models on Poisoned Data, NeurIPS 2021'
    reference = "github.com/bboylyg/ABL (the authors' release; read only for its BatchNorm mode: implemented from the paper)"
    uses_training_set = True
    params_doc = {
        "epochs": "LGA isolation epochs over the training set (paper: T_te = 20; 5 is the CPU default)",
        "gamma": "LGA loss threshold: per-image losses below it are ascended (paper: 0.5)",
        "isolation_ratio": "share of training images with the lowest loss that is isolated (paper: 0.01)",
        "init": '"scratch": train a freshly initialised copy (ABL); "model": start from the suspicious model',
        "lr": "AdamW learning rate of the isolation training",
        "batch_size": "training images per step",
        "unlearn": "also return the suspicious model unlearned on the isolated images (the runner scores it "
                   "instead of retraining)",
        "unlearn_epochs": "gradient-ascent epochs on the isolated images (paper: 5)",
        "unlearn_lr": "SGD learning rate of the unlearning (paper: 5e-4)",
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``); checked in check_params
    epochs: int = 5
    gamma: float = 0.5
    isolation_ratio: float = 0.01
    init: str = "scratch"
    lr: float = 2e-3
    batch_size: int = 16
    unlearn: bool = False
    unlearn_epochs: int = 5
    unlearn_lr: float = 5e-4

    def check_params(self) -> None:
        for key in ("epochs", "batch_size", "unlearn_epochs"):
            check(is_int(getattr(self, key), 1), key, "an integer >= 1", getattr(self, key))
        check(is_num(self.gamma) and self.gamma >= 0, "gamma", "a number >= 0", self.gamma)
        check(is_num(self.isolation_ratio) and 0 < self.isolation_ratio < 1, "isolation_ratio", "a number in (0, 1)",
              self.isolation_ratio)
        check(is_num(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        check(is_num(self.unlearn_lr) and self.unlearn_lr > 0, "unlearn_lr", "a number > 0", self.unlearn_lr)
        check(self.init in INITS, "init", " or ".join(map(repr, INITS)), self.init)
        check(isinstance(self.unlearn, bool), "unlearn", "true or false", self.unlearn)

    def _batch(self, ctx: DefenseContext, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)
        x = to_input(ctx.train.images[idx], ctx.device)
        y = torch.from_numpy(np.array(ctx.train.labels[idx])).long().to(ctx.device)
        return x, y

    def _isolate_train(self, net: nn.Module, ctx: DefenseContext, budget: Budget, meter: CostMeter) -> int:
        """LGA training; returns the epochs completed (a budget stops it between batches)."""
        n = len(ctx.train)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=self.lr)
        rng = np.random.default_rng(ctx.seed)
        net.train()
        for epoch in range(self.epochs):
            order = rng.permutation(n)
            for s in range(0, n, self.batch_size):
                idx = order[s : s + self.batch_size]
                if budget.spent(2 * len(idx) + n):  # keep room for the loss pass over the training set
                    return epoch
                x, y = self._batch(ctx, idx)
                set_bn_training(net, batch_trains_bn(len(idx)))
                loss = lga_loss(image_losses(net(x)["out"], y, ctx.ignore_index), self.gamma)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                meter.forward += len(idx)
                meter.backward += len(idx)
            report(ctx.progress, 0.9 * (epoch + 1) / self.epochs, f"ABL isolation epoch {epoch + 1}/{self.epochs}")
        return self.epochs

    @torch.no_grad()
    def _losses(self, net: nn.Module, ctx: DefenseContext, meter: CostMeter) -> np.ndarray:
        net.eval()
        n = len(ctx.train)
        out = np.empty(n)
        for s in range(0, n, 32):
            idx = np.arange(s, min(n, s + 32))
            x, y = self._batch(ctx, idx)
            out[idx] = image_losses(net(x)["out"], y, ctx.ignore_index).double().cpu().numpy()
            meter.forward += len(idx)
        return out

    def _unlearn(self, model: nn.Module, ctx: DefenseContext, isolated: np.ndarray, budget: Budget,
                 meter: CostMeter) -> tuple[nn.Module, int]:
        """ABL's unlearning: gradient ascent (SGD, momentum 0.9 as the paper) on the isolated images."""
        net = copy.deepcopy(model).to(ctx.device).train()
        opt = torch.optim.SGD(net.parameters(), lr=self.unlearn_lr, momentum=0.9, weight_decay=1e-4)
        for epoch in range(self.unlearn_epochs):
            for s in range(0, len(isolated), self.batch_size):
                idx = isolated[s : s + self.batch_size]
                if budget.spent(2 * len(idx)):
                    return net.eval(), epoch
                x, y = self._batch(ctx, idx)
                set_bn_training(net, batch_trains_bn(len(idx)))
                loss = -image_losses(net(x)["out"], y, ctx.ignore_index).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                meter.forward += len(idx)
                meter.backward += len(idx)
        return net.eval(), self.unlearn_epochs

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        if ctx.train is None:
            raise ValueError("abl needs the training set (uses_training_set = True); the runner did not pass it")
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        n = len(ctx.train)
        model = model.to(ctx.device)
        net = reinitialise(model, ctx.seed) if self.init == "scratch" else copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # dropout and any other randomness of the training steps
            done = self._isolate_train(net, ctx, budget, meter)
            losses = self._losses(net, ctx, meter)
            k = max(1, math.ceil(self.isolation_ratio * n))
            isolated = np.sort(np.argsort(losses, kind="stable")[:k]).astype(np.int64)
            self.losses_ = losses  # every training image's isolation loss, in training-set order (for analysis)
            repaired, unlearned = (self._unlearn(model, ctx, isolated, budget, meter) if self.unlearn else (None, 0))
        report(ctx.progress, 1.0, f"ABL isolated {k} of {n} training images")
        details = {
            "isolated": int(k), "train_size": int(n), "isolation_ratio": self.isolation_ratio,
            "removed_fraction": k / n, "nominal_fraction": self.isolation_ratio,
            "epochs_done": int(done), "epochs": self.epochs, "gamma": self.gamma, "init": self.init,
            "isolated_losses": losses[isolated].tolist(), "median_loss": float(np.median(losses)),
            "unlearn": self.unlearn, "unlearn_epochs_done": int(unlearned),
            "note": ("unlearn=True: the runner scores the unlearned model, not a retraining without the isolated "
                     "images" if self.unlearn else ""),
            **budget.summary(),
        }
        return DefenseResult(model=repaired, flagged_train=isolated, cost=meter.cost(), details=details)
