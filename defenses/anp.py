"""Adversarial Neuron Pruning (ANP; Wu & Wang, NeurIPS 2021) adapted to segmentation.

Every BatchNorm channel ("neuron") k gets a mask ``m_k`` in [0, 1] (start 1) and, during the optimisation,
multiplicative perturbations ``delta_k`` (of the BN weight) and ``xi_k`` (of the BN bias): the layer computes
``gamma_k (m_k + delta_k) x_hat + beta_k (1 + xi_k)``.  Per iteration, on a mini-batch of the clean subset
drawn with replacement (as the reference's ``RandomSampler(replacement=True)``):

1. the perturbations start uniform in [-eps, eps] and take ``anp_steps`` signed-gradient ascent steps of size
   eps / anp_steps on the per-pixel cross-entropy (SGD on -CE with the gradient's sign);
2. the masks take one SGD step (lr, momentum 0.9) on ``alpha × CE(masked) + (1 − alpha) × CE(masked and
   perturbed)``, then are clipped to [0, 1].

After ``nb_iter`` iterations the suspicious model is pruned: the channels whose mask is ≤ ``threshold``
(``prune_by="threshold"``) or the ``fraction`` of channels with the smallest masks (``prune_by="fraction"``)
get BatchNorm weight 0 (the reference's ``pruning``: the bias is kept).  The model's own weights are never
trained.  Reference: BackdoorBench ``defense/anp.py`` and ``anp_model/anp_batchnorm.py`` (ANP's own code).

BatchNorm: both references optimise the masks in ``model.train()`` mode (ANP's ``optimize_mask_cifar.py``
``mask_train``, BackdoorBench's ``defense/anp.py`` ``mask_train``), so ``NoisyBatchNorm2d`` normalises by the
batch's statistics; the running statistics it updates on the way are never used for the result, because both
prune a fresh copy of the original checkpoint (ANP's ``prune_neuron_cifar.py``; BackdoorBench's ``net_prune``).
``bn="train"`` (the default, revision 2) does the same: the hook normalises by the batch's statistics and leaves
the running statistics untouched, so the pruned model keeps the suspicious model's; a batch of one image uses
the running statistics (train-mode BN needs more than one value per channel, and ASPP's pooled branch has one).
``bn="frozen"`` normalises by the running statistics (eval-mode BN), anp's behaviour before revision 2.  The rest
of the model stays in eval mode (dropout off).  The masks/perturbations are applied by forward hooks that
recompute each BN output, so any model with ``nn.BatchNorm2d`` layers works.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import cross_entropy, report, to_input
from testbed.defenses._repair import batch_trains_bn, begin, bn_used, check, check_bn, is_int, is_num, miou
from testbed.defenses.protocol import DefenseContext, DefenseResult

PRUNE_BY = ("threshold", "fraction")


class NoisyBN:
    """Mask and perturbation parameters for one BatchNorm2d, applied by a forward hook."""

    def __init__(self, bn: nn.BatchNorm2d, batch_stats: bool = False) -> None:
        c, dev = bn.num_features, bn.weight.device
        self.bn = bn
        self.batch_stats = batch_stats  # normalise by the batch's statistics (train-mode BN, running ones untouched)
        self.mask = torch.ones(c, device=dev, requires_grad=True)
        self.noise = torch.zeros(c, device=dev, requires_grad=True)
        self.noise_bias = torch.zeros(c, device=dev, requires_grad=True)
        self.perturbed = False
        self.hook = bn.register_forward_hook(self._forward)

    def _forward(self, bn, inputs, output):
        weight = bn.weight * (self.mask + self.noise if self.perturbed else self.mask)
        bias = bn.bias * (1 + self.noise_bias) if self.perturbed else bn.bias
        x = inputs[0]
        if self.batch_stats and batch_trains_bn(len(x)):  # as NoisyBatchNorm2d in train mode, buffers untouched
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)


def batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine
            and m.running_var is not None]


@dataclass(eq=False)
class ANP:
    """Adversarial Neuron Pruning: learn BatchNorm-channel masks under adversarial neuron perturbation, prune.

    Parameters: ``eps`` (0.4), ``alpha`` (0.2), ``anp_steps`` (1), ``nb_iter`` (ANP: 2000), ``lr`` (mask SGD
    learning rate, ANP: 0.2), ``batch_size`` (16; ANP: 128), ``prune_by`` ("threshold" | "fraction"),
    ``threshold`` (0.2), ``fraction`` (0.05), ``bn`` ("train": masks optimised on batch statistics, as ANP's
    ``model.train()``; "frozen": on the running statistics).
    """

    name = "anp"
    # 2: the masks are optimised with BatchNorm on batch statistics, as the references' model.train() (was: running
    # statistics; a bench's pairs of revision 1 are run again)
    revision = 2
    paper = 'Wu & Wang: Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021'
    reference = 'github.com/SCLBD/BackdoorBench defense/anp.py, utils/defense_utils/anp/anp_model/anp_batchnorm.py'
    uses_training_set = False
    params_doc = {
        "eps": "bound of the multiplicative neuron perturbation (ANP: 0.4)",
        "alpha": "weight of the natural loss; 1 - alpha weighs the perturbed loss (ANP: 0.2)",
        "anp_steps": "signed-gradient steps of the perturbation per iteration (ANP: 1)",
        "nb_iter": "mask optimisation iterations, one mini-batch each (ANP: 2000)",
        "lr": "mask SGD learning rate, momentum 0.9 (ANP: 0.2)",
        "batch_size": "clean images per iteration, drawn with replacement (ANP: 128, for subsets of 2 500)",
        "prune_by": '"threshold": prune masks <= threshold; "fraction": prune that share of smallest masks',
        "threshold": "mask value at or below which a channel is pruned (ANP: 0.2)",
        "fraction": "share of channels pruned when prune_by is fraction",
        "bn": "BatchNorm while optimising the masks: train (batch statistics, as ANP) or frozen (running statistics)",
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``); checked in check_params
    eps: float = 0.4
    alpha: float = 0.2
    anp_steps: int = 1
    nb_iter: int = 2000
    lr: float = 0.2
    batch_size: int = 16
    prune_by: str = "threshold"
    threshold: float = 0.2
    fraction: float = 0.05
    bn: str = "train"

    def check_params(self) -> None:
        check(is_num(self.eps) and self.eps >= 0, "eps", "a number >= 0", self.eps)
        check(is_num(self.alpha) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)
        check(is_int(self.anp_steps, 1), "anp_steps", "an integer >= 1", self.anp_steps)
        check(is_int(self.nb_iter), "nb_iter", "an integer >= 0", self.nb_iter)
        check(is_num(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        check(is_int(self.batch_size, 1), "batch_size", "an integer >= 1", self.batch_size)
        check(self.prune_by in PRUNE_BY, "prune_by", " or ".join(map(repr, PRUNE_BY)), self.prune_by)
        check(is_num(self.threshold) and 0 <= self.threshold <= 1, "threshold", "a number in [0, 1]", self.threshold)
        check(is_num(self.fraction) and 0 <= self.fraction <= 1, "fraction", "a number in [0, 1]", self.fraction)
        check_bn(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        first = begin(self, model, ctx)
        model, meter, budget, start = first.model.requires_grad_(False), first.meter, first.budget, first.miou
        names = [name for name, _ in batchnorms(model)]
        noisy = [NoisyBN(bn, self.bn == "train") for _, bn in batchnorms(model)]
        try:
            done = self._optimise(model, noisy, ctx, budget, meter)
        finally:
            for nb in noisy:
                nb.hook.remove()
        masks = {name: nb.mask.detach().cpu().numpy().astype(float) for name, nb in zip(names, noisy)}
        pruned = self._prune(model, masks)
        final = miou(model, ctx, meter)
        report(ctx.progress, 1.0, f"anp done: {sum(map(len, pruned.values()))} channels pruned, clean mIoU {final:.3f}")
        total = sum(len(m) for m in masks.values())
        count = sum(len(p) for p in pruned.values())
        quantiles = np.quantile(np.concatenate(list(masks.values())), [0, 0.05, 0.25, 0.5, 1]).tolist() if total else []
        details = {"iterations": done, "channels": total, "pruned": count,
                   "pruned_fraction": count / total if total else 0.0,
                   "pruned_channels": {k: v for k, v in pruned.items() if v}, "mask_quantiles": quantiles,
                   "miou_clean_start": start, "miou_clean_final": final, "prune_by": self.prune_by,
                   "bn": self.bn,
                   "bn_used": bn_used(self.bn, self.batch_size, self.batch_size),  # drawn with replacement
                   **budget.summary()}
        return DefenseResult(model=model, cost=meter.cost(), details=details)

    def _optimise(self, model, noisy, ctx, budget, meter) -> int:
        """``nb_iter`` iterations of perturbation ascent + mask descent; returns the iterations done."""
        masks = [nb.mask for nb in noisy]
        noises = [t for nb in noisy for t in (nb.noise, nb.noise_bias)]
        mask_opt = torch.optim.SGD(masks, lr=self.lr, momentum=0.9)
        noise_opt = torch.optim.SGD(noises, lr=self.eps / self.anp_steps)
        images, labels = ctx.clean_images, np.asarray(ctx.clean_labels)
        rng = np.random.default_rng(ctx.seed)
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        b = self.batch_size
        per_iter = (2 * self.anp_steps + 4) * b if self.eps > 0 else 2 * b  # forwards + backwards per image
        for it in range(self.nb_iter):
            if budget.spent(per_iter + len(images)):  # this iteration, and the final mIoU's reserve
                return it
            idx = rng.integers(0, len(images), size=b)
            x = to_input(images[idx], ctx.device)
            y = torch.from_numpy(labels[idx]).long().to(ctx.device)
            ce = lambda: cross_entropy(model(x)["out"], y, ctx.ignore_index)  # noqa: E731
            if self.eps > 0:
                with torch.no_grad():
                    for t in noises:  # random start in the eps box (the reference's reset(rand_init=True))
                        t.copy_(torch.rand(t.shape, generator=gen).mul_(2 * self.eps).sub_(self.eps).to(t.device))
                for nb in noisy:
                    nb.perturbed = True
                for _ in range(self.anp_steps):
                    noise_opt.zero_grad(set_to_none=True)
                    (-ce()).backward()
                    for t in noises:
                        t.grad = torch.sign(t.grad)
                    noise_opt.step()
            mask_opt.zero_grad(set_to_none=True)
            loss_rob = ce() if self.eps > 0 else 0.0
            for nb in noisy:
                nb.perturbed = False
            loss = self.alpha * ce() + (1 - self.alpha) * loss_rob
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0, 1)
            meter.forward += (self.anp_steps + 2) * b if self.eps > 0 else b
            # the mask loss backs through two forwards (natural and perturbed)
            meter.backward += (self.anp_steps + 2) * b if self.eps > 0 else b
            if (it + 1) % max(1, self.nb_iter // 20) == 0:
                report(ctx.progress, 0.95 * (it + 1) / self.nb_iter, f"anp iteration {it + 1}/{self.nb_iter}")
        return self.nb_iter

    def _prune(self, model, masks: dict[str, np.ndarray]) -> dict[str, list[int]]:
        """Zero the BatchNorm weight of the channels the masks condemn; returns layer → pruned channels."""
        modules = dict(model.named_modules())
        if self.prune_by == "threshold":
            cut = {name: np.flatnonzero(m <= self.threshold) for name, m in masks.items()}
        else:
            flat = [(v, name, i) for name, m in masks.items() for i, v in enumerate(m)]
            flat.sort(key=lambda t: (t[0], t[1], t[2]))  # smallest masks first; ties by layer name, channel
            k = int(round(self.fraction * len(flat)))
            cut = {name: [] for name in masks}
            for _, name, i in flat[:k]:
                cut[name].append(i)
            cut = {name: np.array(sorted(c), dtype=np.int64) for name, c in cut.items()}
        with torch.no_grad():
            for name, idx in cut.items():
                if len(idx):
                    modules[name].weight[torch.as_tensor(idx, device=modules[name].weight.device)] = 0
        return {name: [int(i) for i in idx] for name, idx in cut.items()}
