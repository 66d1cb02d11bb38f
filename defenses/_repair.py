"""Helpers the repair defenses (ft, nad, anp, i-bau, fine-pruning) share: parameter checks, the clean-subset SGD
loop, BatchNorm freezing or training (``bn_mode``) and the clean mIoU bookends.

Kept apart from :mod:`testbed.defenses._features` (helpers of every defense) because only the defenses that
train the model on the clean subset need them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from testbed.defenses._features import Budget, CostMeter, check, check_clean, clean_miou, is_int, is_num, report
from testbed.defenses.protocol import DefenseContext


@dataclass
class Start:
    """What every repair defense begins with: its own copy of the model (eval mode), the pass meter, the
    budget, and the clean mIoU before any change."""

    model: nn.Module
    meter: CostMeter
    budget: Budget
    miou: float


def begin(defense: Any, model: nn.Module, ctx: DefenseContext) -> Start:
    """Check the parameters and the clean subset, copy the model to the device, measure the starting mIoU."""
    defense.check_params()
    check_clean(ctx, defense.name)
    meter = CostMeter()
    budget = Budget.for_context(ctx, meter)
    model = copy.deepcopy(model).to(ctx.device).eval()
    return Start(model, meter, budget, miou(model, ctx, meter))


def probe(model: nn.Module, hooks: list, image_size: tuple[int, int], device: torch.device) -> None:
    """One forward pass of a zero image in eval mode without gradients (hooks record what they need), then the
    hooks are removed (data-free: no clean image is used)."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *image_size, device=device))
    finally:
        for h in hooks:
            h.remove()


def set_bn_training(model: nn.Module, training: bool) -> None:
    """Put every BatchNorm layer of ``model`` in training (batch statistics) or eval (running statistics) mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(training)


def batch_trains_bn(n_images: int) -> bool:
    """Whether a batch of ``n_images`` may normalise by its own statistics: not a batch of one image, because
    train-mode BatchNorm needs more than one value per channel and a model that pools to 1×1 (the ASPP of
    ``deeplabv3plus_tiny``) has only one there; such a batch keeps the running statistics."""
    return n_images > 1


def freeze_bn(model: nn.Module) -> None:
    """Keep BatchNorm statistics fixed (eval-mode BN)."""
    set_bn_training(model, False)


BN_MODES = ("train", "frozen")


def check_bn(obj: Any) -> None:
    """The ``bn`` parameter of the defenses that let BatchNorm train (ft, nad, fine-pruning, anp): "train" or
    "frozen"."""
    check(obj.bn in BN_MODES, "bn", '"train" or "frozen"', obj.bn)


def bn_used(bn: str, batch_size: int, n_images: int) -> str:
    """The details' ``bn_used``: what BatchNorm did with ``bn`` (the parameter, kept as the details' ``bn``) over
    epochs of ``n_images`` in batches of ``batch_size`` (the last one short, as ``clean_loader`` makes them).
    "train" runs on batch statistics except in batches :func:`batch_trains_bn` refuses (one image), which keep the
    running statistics: every batch when ``min(batch_size, n_images)`` is 1, else the last one when
    ``n_images % batch_size`` is 1."""
    if bn != "train":
        return bn
    if not batch_trains_bn(min(batch_size, n_images)):
        return "frozen (every batch is one image: the running statistics are kept)"
    if n_images > batch_size and not batch_trains_bn(n_images % batch_size or batch_size):
        return "train (except each epoch's last batch, one image, on the running statistics)"
    return "train"


def bn_mode(bn: str, loss_fn: BatchLoss) -> BatchLoss:
    """``loss_fn`` for ``train_clean`` with BatchNorm as ``bn`` says: "frozen" returns it as is (``train_clean``
    freezes BN at each epoch's start); "train" puts BN in training mode before every batch — batch statistics,
    running statistics updated, as the references' ``model.train()`` — except where :func:`batch_trains_bn` says
    the batch cannot (one image)."""
    if bn == "frozen":
        return loss_fn

    def wrapped(m, x, y):
        set_bn_training(m, batch_trains_bn(len(x)))
        return loss_fn(m, x, y)
    return wrapped


def check_sgd(obj: Any, epochs: str = "epochs") -> None:
    """The parameters every clean-subset SGD loop takes: ``epochs`` (named as given), lr, batch_size, momentum,
    weight_decay."""
    check(is_int(getattr(obj, epochs)), epochs, "an integer >= 0", getattr(obj, epochs))
    check(is_num(obj.lr) and obj.lr > 0, "lr", "a number > 0", obj.lr)
    check(is_int(obj.batch_size, 1), "batch_size", "an integer >= 1", obj.batch_size)
    check(is_num(obj.momentum) and 0 <= obj.momentum < 1, "momentum", "a number in [0, 1)", obj.momentum)
    check(is_num(obj.weight_decay) and obj.weight_decay >= 0, "weight_decay", "a number >= 0", obj.weight_decay)


@dataclass(frozen=True)
class SGDPlan:
    """One clean-subset training phase: SGD settings, learning-rate schedule and the progress span it covers."""

    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    schedule: str = "cosine"  # "cosine": CosineAnnealingLR over the epochs (BackdoorBench); "constant"
    label: str = "fine-tuning"
    span: tuple[float, float] = (0.0, 1.0)


# loss(model, x, y) -> (loss, forward images, backward images): what one batch costs, counted by the caller
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int, int]]


def train_clean(model: nn.Module, ctx: DefenseContext, plan: SGDPlan, loss_fn: BatchLoss, budget: Budget,
                meter: CostMeter, passes_per_image: int = 2,
                after_step: Callable[[], None] | None = None) -> tuple[int, bool]:
    """SGD over the clean subset for ``plan.epochs``, seeded by ``ctx.seed``.  BatchNorm is frozen (eval mode)
    at each epoch's start; a ``loss_fn`` wrapped by :func:`bn_mode` with "train" puts it in training mode per batch.

    Before every batch ``budget`` is asked for the batch's ``passes_per_image`` × images plus one clean
    forward per image in reserve (the final clean mIoU); ``after_step`` runs after every optimiser step
    (fine-pruning re-zeroes its pruned channels there).  Returns (epochs completed, stopped by the budget).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    loader = ctx.clean_loader(batch_size=plan.batch_size, shuffle=True)
    reserve, (lo, hi) = len(ctx.clean_images), plan.span
    done = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)  # dropout, if the model has any
        try:
            for epoch in range(plan.epochs):
                if plan.schedule == "cosine":  # torch's CosineAnnealingLR(T_max=epochs, eta_min=0), per epoch
                    for g in opt.param_groups:
                        g["lr"] = 0.5 * plan.lr * (1 + math.cos(math.pi * epoch / plan.epochs))
                model.train()
                freeze_bn(model)
                for x, y in loader:
                    if budget.spent(passes_per_image * len(x) + reserve):
                        return done, True
                    loss, fwd, bwd = loss_fn(model, x.to(ctx.device), y.to(ctx.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if after_step is not None:
                        after_step()
                    meter.forward += fwd
                    meter.backward += bwd
                done = epoch + 1
                report(ctx.progress, lo + (hi - lo) * done / plan.epochs, f"{plan.label} epoch {done}/{plan.epochs}")
        finally:
            model.eval()  # the returned model is in eval mode, however the loop ended
    return done, False


def miou(model: nn.Module, ctx: DefenseContext, meter: CostMeter) -> float:
    """Clean mIoU (fraction) of ``model`` on the clean subset; one counted forward per clean image."""
    meter.forward += len(ctx.clean_images)
    return clean_miou(model, ctx.clean_images, ctx.clean_labels, ctx.num_classes, ctx.device,
                      ignore_index=ctx.ignore_index)
