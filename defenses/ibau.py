"""Implicit Backdoor Adversarial Unlearning (I-BAU; Zeng et al., ICLR 2022) adapted to segmentation.

A minimax problem: the inner maximisation finds one universal additive perturbation δ of the input that
maximises the model's loss; the outer minimisation updates the model so that clean images carrying δ are
still segmented correctly.  Each of ``n_rounds`` rounds (BackdoorBench ``defense/i-bau.py`` and I-BAU's own
code, read and re-implemented):

1. δ starts at 0 and takes one SGD step (lr 10) per clean batch on ``-CE(f(x + δ), f(x)) + 0.001 ||δ||²``,
   CE per pixel against the model's own argmax predictions.
2. For each clean batch, the outer step: the loss ``E(δ, θ) = CE(f(x + δ·s), y)`` (per-pixel CE against the
   clean labels; ``s`` adds δ to a random ``portion`` of the batch) and its hypergradient through the inner
   problem, computed with the fixed-point method (Grazzi et al., ``hypergrad.fixed_point``): the inner map
   ``Φ(δ, θ) = δ − 0.1 ∇_δ [−CE(f(x₀ + δ), y₀) + 0.001 ||δ||²]`` on the first clean batch (x₀, y₀), the vector
   ``v ← (∂Φ/∂δ)ᵀ v + ∂E/∂δ`` iterated ``K`` times from 0, and ``dE/dθ = ∂E/∂θ + (∂Φ/∂θ)ᵀ v``; then one Adam
   step (lr 1e-4) on θ.

The model stays in eval mode throughout (BatchNorm statistics frozen), as in the reference.  The perturbation
lives in the model's input space ([0, 1] images; the model normalises internally) where the reference adds it
to normalised images, and it is not clipped (neither is the reference's).  Deviation: the reference patches
``int(0.01 × batch)`` images per batch, which is 0 for any batch under 100 images and turns I-BAU into plain
fine-tuning; here at least one image per batch carries δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import Budget, CostMeter, cross_entropy, report
from testbed.defenses._repair import begin, check, is_int, is_num, miou
from testbed.defenses.protocol import DefenseContext, DefenseResult

INNER_LR = 0.1  # the fixed-point map's gradient step (I-BAU: GradientDescent(loss_inner, 0.1))
SEARCH_LR = 10.0  # the perturbation search's SGD learning rate (I-BAU: lr=10)
NORM_WEIGHT = 0.001  # weight of ||δ||² in both inner losses (I-BAU)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def fixed_point_hypergrad(delta: torch.Tensor, params: list[torch.Tensor], k: int, fp_map, outer_loss) -> int:
    """Add the hypergradient dE/dθ of ``outer_loss(δ)`` to ``p.grad`` for each ``p`` in ``params``.

    ``fp_map(δ)`` is one differentiable step of the inner solver; ``v`` is iterated ``k`` times (stopping
    early when it changes by less than 1e-10, as the reference).  Returns the iterations run.
    """
    delta = delta.detach().requires_grad_(True)
    e = outer_loss(delta)
    g_delta = torch.autograd.grad(e, delta, retain_graph=True)[0]
    g_params = torch.autograd.grad(e, params, allow_unused=True)
    mapped = fp_map(delta)
    v, done = torch.zeros_like(delta), 0
    for done in range(1, k + 1):
        prev = v
        v = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)[0] + g_delta
        if float(torch.linalg.vector_norm(v - prev)) < 1e-10:
            break
    indirect = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    for p, a, b in zip(params, g_params, indirect):
        g = (torch.zeros_like(p) if a is None else a) + (0 if b is None else b)
        p.grad = g if p.grad is None else p.grad + g
    return done


@dataclass
class _Run:
    """What one run's steps share."""

    model: nn.Module
    params: list
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    ctx: DefenseContext
    budget: Budget
    meter: CostMeter


class IBAU:
    """I-BAU: unlearn a universal adversarial perturbation, with the implicit hypergradient (fixed point).

    Parameters: ``n_rounds`` (BackdoorBench: 5), ``k`` (fixed-point iterations, 5), ``lr`` (Adam, 1e-4),
    ``batch_size`` (16), ``portion`` (share of each batch carrying the perturbation in the outer loss, 0.01,
    at least one image).
    """

    name = "i-bau"
    paper = 'Zeng et al.: Adversarial Unlearning of Backdoors via Implicit Hypergradient, ICLR 2022'
    reference = "github.com/SCLBD/BackdoorBench defense/i-bau.py (with I-BAU's hypergrad.fixed_point)"
    uses_training_set = False
    params_doc = {
        "n_rounds": "unlearning rounds: a perturbation search, then one outer step per clean batch (BackdoorBench: 5)",
        "k": "fixed-point iterations of the implicit hypergradient (BackdoorBench: 5)",
        "lr": "Adam learning rate of the outer (model) step (BackdoorBench: 1e-4)",
        "batch_size": "clean images per batch",
        "portion": "share of a batch given the perturbation in the outer loss (I-BAU: 0.01; at least one image)",
    }

    def __init__(self, n_rounds: int = 5, k: int = 5, lr: float = 1e-4, batch_size: int = 16,
                 portion: float = 0.01) -> None:
        self.n_rounds, self.k, self.lr, self.batch_size, self.portion = n_rounds, k, lr, batch_size, portion

    def check_params(self) -> None:
        check(is_int(self.n_rounds), "n_rounds", "an integer >= 0", self.n_rounds)
        check(is_int(self.k, 1), "k", "an integer >= 1", self.k)
        check(is_num(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        check(is_int(self.batch_size, 1), "batch_size", "an integer >= 1", self.batch_size)
        check(is_num(self.portion) and 0 <= self.portion <= 1, "portion", "a number in [0, 1]", self.portion)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        first = begin(self, model, ctx)
        model, meter, budget, start = first.model, first.meter, first.budget, first.miou
        batches = [(x.to(ctx.device), y.to(ctx.device)) for x, y in ctx.clean_loader(self.batch_size, shuffle=True)]
        params = [p for p in model.parameters() if p.requires_grad]
        run = _Run(model, params, torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999)),
                   np.random.default_rng(ctx.seed), ctx, budget, meter)
        rounds, norms, stopped = [], [], False
        for r in range(self.n_rounds):
            delta, stopped = self._search(run, batches)
            norms.append(float(torch.linalg.vector_norm(delta)))
            if not stopped:
                stopped = self._unlearn(run, delta, batches)
            if stopped:
                break
            rounds.append(r + 1)
            report(ctx.progress, (r + 1) / self.n_rounds,
                   f"i-bau round {r + 1}/{self.n_rounds}, |delta| {norms[-1]:.2f}")
        model.eval()
        final = miou(model, ctx, meter)
        details = {"rounds_done": len(rounds), "perturbation_l2": norms, "miou_clean_start": start,
                   "miou_clean_final": final, **budget.summary()}
        return DefenseResult(model=model, cost=meter.cost(), details=details)

    def _search(self, run: _Run, batches) -> tuple[torch.Tensor, bool]:
        """The inner maximisation: one SGD step of δ per clean batch against the model's own predictions."""
        model, ctx, budget, meter = run.model, run.ctx, run.budget, run.meter
        h, w = batches[0][0].shape[-2:]
        delta = torch.zeros(1, 3, h, w, device=ctx.device, requires_grad=True)
        opt = torch.optim.SGD([delta], lr=SEARCH_LR)
        reserve = len(ctx.clean_images)
        for x, _ in batches:
            if budget.spent(3 * len(x) + reserve):
                return delta.detach(), True
            with torch.no_grad():
                pseudo = model(x)["out"].argmax(1)
            loss = -F.cross_entropy(model(x + delta)["out"], pseudo) + NORM_WEIGHT * delta.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.forward += 2 * len(x)
            meter.backward += len(x)
        return delta.detach(), False

    def _unlearn(self, run: _Run, delta: torch.Tensor, batches) -> bool:
        """One outer Adam step per clean batch with the fixed-point hypergradient; True when a budget stopped it."""
        model, meter, x0, y0 = run.model, run.meter, *batches[0]
        ignore = run.ctx.ignore_index

        def fp_map(d):  # one gradient step of the inner problem on the first batch, differentiable in δ and θ
            inner = -cross_entropy(model(x0 + d)["out"], y0, ignore) + NORM_WEIGHT * d.pow(2).sum()
            return d - INNER_LR * torch.autograd.grad(inner, d, create_graph=True)[0]

        reserve = len(run.ctx.clean_images)
        for x, y in batches:
            b, b0 = len(x), len(x0)
            # outer forward + 2 backwards; inner forward + backward; k + 1 products through that gradient's graph
            passes = 3 * b + 2 * b0 + 2 * (self.k + 1) * b0
            if run.budget.spent(passes + reserve):
                return True
            chosen = run.rng.choice(b, size=max(1, int(math.floor(b * self.portion))), replace=False)
            patch = torch.zeros(b, 1, 1, 1, device=x.device)
            patch[torch.as_tensor(chosen, device=x.device)] = 1

            def outer_loss(d):
                return cross_entropy(model(x + patch * d)["out"], y, ignore)

            run.opt.zero_grad(set_to_none=True)
            iters = fixed_point_hypergrad(delta, run.params, self.k, fp_map, outer_loss)
            run.opt.step()
            meter.forward += b + b0 + (iters + 1) * b0
            meter.backward += 2 * b + b0 + (iters + 1) * b0
        return False
