"""Neural Cleanse's trigger optimisation for many candidates at once (the engine of ``trigger_synthesis``).

Each candidate (source, target) owns a mask ``m = sigmoid(a)`` [H,W], a pattern ``Δ = sigmoid(b)`` [3,H,W],
its own Adam moments, its own λ schedule, its own early stop and its own random stream (initialisation and
mini-batches).  Up to ``candidate_batch`` candidates are optimised together: their triggered batches are
stacked along the batch dimension and go through the model in one forward/backward, and a candidate that
stops frees its slot for the next in line.  Nothing is shared between candidates except the forward pass
(the model is in eval mode, so every image is computed independently), so a candidate's trajectory is the
same whether it runs alone (``candidate_batch=1``, the sequential mode) or with others — up to the float
rounding of batched kernels.  That is why Adam is written out here (elementwise, per-candidate step counts)
instead of ``torch.optim.Adam``, whose state cannot drop a finished candidate's rows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ADAM_BETAS = (0.5, 0.9)  # Neural Cleanse's Adam
ADAM_EPS = 1e-8


def mask_penalty(mask: torch.Tensor, cost: torch.Tensor | float) -> torch.Tensor:
    """Neural Cleanse's regulariser ``λ·‖m‖₁`` per candidate: ``mask [A,1,H,W]`` (values in [0,1]) → ``[A]``.

    The raw L1 norm — the sum over the H·W mask pixels, not a mean — as in Wang et al.'s code (the mask is
    repeated over the 3 colour channels and the sum divided by 3) and BackdoorBench, so ``λ₀ = 1e-3`` means
    what it means there.  (A mean over pixels would make λ H·W times weaker: 4096× at 64², 262144× at 512².)
    """
    return cost * mask.abs().flatten(1).sum(1)


@dataclass
class ScheduleConfig:
    init_cost: float = 1e-3
    patience: int = 5
    cost_up: float = 1.5
    cost_down: float = 1.5 ** 1.5
    success_threshold: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 10
    max_steps: int = 300


class NCSchedule:
    """Neural Cleanse's λ schedule and early stop, one row per candidate (vectorised over candidates).

    Per step, after the attack success and mask norm of that step are known (Wang et al.'s visualizer, in
    this order): the best norm among successful masks is kept; the early-stop counter grows while that best
    norm improves by less than ``1 − early_stop_threshold`` (1%), and the candidate stops once λ has been
    raised and lowered at least once each and the counter reached ``early_stop_patience``; then λ moves —
    from 0 to ``init_cost`` after ``patience`` successful steps in a row, ×``cost_up`` after ``patience``
    successful steps, ÷``cost_down`` after ``patience`` failing ones.  A candidate also stops at ``max_steps``.
    """

    _FIELDS = ("cost", "set_count", "up", "down", "up_flag", "down_flag", "es_count", "es_best", "best", "steps")

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.cost = np.zeros(0)
        self.set_count = np.zeros(0, np.int64)
        self.up = np.zeros(0, np.int64)
        self.down = np.zeros(0, np.int64)
        self.up_flag = np.zeros(0, bool)
        self.down_flag = np.zeros(0, bool)
        self.es_count = np.zeros(0, np.int64)
        self.es_best = np.zeros(0)
        self.best = np.zeros(0)
        self.steps = np.zeros(0, np.int64)

    def add(self, n: int = 1) -> None:
        """Append ``n`` fresh candidates: λ = 0, nothing found yet."""
        for name in self._FIELDS:
            old = getattr(self, name)
            fill = math.inf if name in ("best", "es_best") else 0
            setattr(self, name, np.concatenate([old, np.full(n, fill, dtype=old.dtype)]))

    def keep(self, rows: np.ndarray) -> None:
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name)[rows])

    def update(self, success: np.ndarray, norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step's success and norm per row → (improved, converged, finished) boolean rows."""
        c = self.cfg
        ok = np.asarray(success) >= c.success_threshold
        improved = ok & (np.asarray(norm) < self.best)
        self.best = np.where(improved, norm, self.best)
        found = np.isfinite(self.best)
        stalled = self.best >= c.early_stop_threshold * self.es_best
        self.es_count = np.where(found, np.where(stalled, self.es_count + 1, 0), self.es_count)
        self.es_best = np.minimum(self.best, self.es_best)
        converged = c.early_stop & self.up_flag & self.down_flag & (self.es_count >= c.early_stop_patience)

        zero = self.cost == 0
        self.set_count = np.where(zero & ok, self.set_count + 1, 0)
        start = zero & ok & (self.set_count >= c.patience)
        self.cost = np.where(start, c.init_cost, self.cost)
        self.up, self.down = np.where(start, 0, self.up), np.where(start, 0, self.down)
        self.up_flag, self.down_flag = self.up_flag & ~start, self.down_flag & ~start
        self.up, self.down = np.where(ok, self.up + 1, 0), np.where(ok, 0, self.down + 1)
        raise_ = self.up >= c.patience
        lower = ~raise_ & (self.down >= c.patience)
        self.cost = np.where(raise_, self.cost * c.cost_up, np.where(lower, self.cost / c.cost_down, self.cost))
        self.up, self.down = np.where(raise_, 0, self.up), np.where(lower, 0, self.down)
        self.up_flag, self.down_flag = self.up_flag | raise_, self.down_flag | lower
        self.steps = self.steps + 1
        return improved, converged, converged | (self.steps >= c.max_steps)


@dataclass
class CandidateResult:
    index: int  # position in the candidate list
    norm: float  # L1 norm of the best mask (the smallest one reaching the success threshold, else the last)
    success: float  # attack success of that mask: share of the epoch's images attacked
    reached: bool  # a mask reached the success threshold (NC's reg_best < inf): the candidate converged
    steps: int  # schedule decisions: epochs (NC), or mini-batches in the cheaper setting
    stop: str  # "converged" (NC's early stop) | "max_steps"
    seconds: float  # this candidate's share of the wall time of the steps it was in
    forward: int
    backward: int
    mask: np.ndarray  # [H,W]
    curve: list = field(default_factory=list)  # mask L1 norm at every step


class _Slots:
    """The candidates being optimised now: stacked parameters, Adam moments and per-row bookkeeping."""

    def __init__(self, cfg: ScheduleConfig, h: int, w: int, device: torch.device) -> None:
        self.h, self.w, self.device = h, w, device
        z = lambda c: torch.zeros(0, c, h, w, device=device)  # noqa: E731
        self.mask_p, self.pattern_p = z(1), z(3)
        self.moments = [z(1), z(1), z(3), z(3)]  # Adam m, v of the mask; m, v of the pattern
        self.best_mask = torch.zeros(0, h, w, device=device)
        self.t = np.zeros(0, np.int64)
        self.ids: list[int] = []
        self.pairs: list[tuple[int, int]] = []
        self.gens: list[torch.Generator] = []
        self.curves: list[list[float]] = []
        self.seconds = np.zeros(0)
        self.last = np.zeros((0, 2))  # last step's (norm, success)
        self.best_success = np.zeros(0)
        self.epoch = np.zeros((0, 3))  # this epoch's sums: attacked images, images that count, mask norm
        self.perms: list[torch.Tensor] = []  # each row's image order for this epoch
        self.passes = np.zeros(0, np.int64)
        self.schedule = NCSchedule(cfg)

    @property
    def size(self) -> int:
        return len(self.ids)

    def add(self, index: int, pair: tuple[int, int], seed: int) -> None:
        g = torch.Generator().manual_seed(int(seed))
        mask = (torch.rand(1, 1, self.h, self.w, generator=g) * 2 - 1).to(self.device)
        pattern = (torch.rand(1, 3, self.h, self.w, generator=g) * 2 - 1).to(self.device)
        self.mask_p, self.pattern_p = torch.cat([self.mask_p, mask]), torch.cat([self.pattern_p, pattern])
        self.moments = [torch.cat([m, torch.zeros_like(p)]) for m, p in zip(self.moments, (mask, mask, pattern, pattern))]
        self.best_mask = torch.cat([self.best_mask, torch.zeros(1, self.h, self.w, device=self.device)])
        self.t = np.append(self.t, 0)
        self.ids.append(index)
        self.pairs.append(pair)
        self.gens.append(g)
        self.curves.append([])
        self.seconds = np.append(self.seconds, 0.0)
        self.last = np.concatenate([self.last, [[math.inf, 0.0]]])
        self.best_success = np.append(self.best_success, 0.0)
        self.epoch = np.concatenate([self.epoch, np.zeros((1, 3))])
        self.perms.append(torch.zeros(0, dtype=torch.long))
        self.passes = np.append(self.passes, 0)
        self.schedule.add(1)

    def keep(self, rows: np.ndarray) -> None:
        idx = torch.from_numpy(np.flatnonzero(rows)).to(self.device)
        self.mask_p, self.pattern_p = self.mask_p[idx], self.pattern_p[idx]
        self.moments = [m[idx] for m in self.moments]
        self.best_mask = self.best_mask[idx]
        for name in ("t", "seconds", "last", "best_success", "epoch", "passes"):
            setattr(self, name, getattr(self, name)[rows])
        for name in ("ids", "pairs", "gens", "curves", "perms"):
            setattr(self, name, [x for x, k in zip(getattr(self, name), rows) if k])
        self.schedule.keep(rows)

    def adam(self, grads: tuple[torch.Tensor, torch.Tensor], lr: float) -> None:
        """One Adam step per row (Kingma & Ba, as ``torch.optim.Adam``), each row with its own step count."""
        b1, b2 = ADAM_BETAS
        self.t = self.t + 1
        t = torch.from_numpy(self.t.astype(np.float64))
        bc1 = (1 - b1 ** t).to(self.device, torch.float32).view(-1, 1, 1, 1)
        bc2 = (1 - b2 ** t).to(self.device, torch.float32).view(-1, 1, 1, 1)
        with torch.no_grad():
            for p, g, m, v in ((self.mask_p, grads[0], *self.moments[:2]), (self.pattern_p, grads[1], *self.moments[2:])):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr / bc1 * m / (v.sqrt() / bc2.sqrt() + ADAM_EPS))

    def result(self, row: int, stop: str) -> CandidateResult:
        steps = int(self.schedule.steps[row])
        reached = bool(np.isfinite(self.schedule.best[row]))
        if reached:
            norm, success, mask = float(self.schedule.best[row]), float(self.best_success[row]), self.best_mask[row]
        else:  # no mask reached the threshold: report the last one
            norm, success = float(self.last[row, 0]), float(self.last[row, 1])
            mask = torch.sigmoid(self.mask_p[row, 0])
        half = int(self.passes[row]) // 2  # every image goes through one forward and one backward
        return CandidateResult(self.ids[row], norm, success, reached, steps, stop, float(self.seconds[row]),
                               half, half, mask.detach().cpu().numpy(), self.curves[row])


def _step(model: nn.Module, slots: _Slots, x_all: torch.Tensor, pred_all: torch.Tensor, idx: torch.Tensor,
          lr: float, pixel_share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """One optimisation step for every slot on its images ``idx [A,b]``: stacked forward/backward, per-row
    loss and Adam update.

    Loss per row = CE toward the candidate's goal + λ·‖m‖₁.  Image-level (source −1): every pixel → t, CE
    averaged over the pixels.  Pair (s, t): pixels the model predicts as s → t and all others keep the clean
    prediction, each term averaged over its own pixels (so a small source region is not drowned out).
    Success is counted per image, as NC counts a classified image: an image is attacked when at least
    ``pixel_share`` of its attacked pixels (all of them at 1.0) reach the target; images without attacked
    pixels (a pair whose source the image lacks) do not count.  Returns per row: attacked images, images
    that count, mask L1 norm, and the masks.
    """
    a = slots.size
    x, pred = x_all[idx], pred_all[idx]  # [A,b,3,H,W], [A,b,H,W]
    src = torch.tensor([s for s, _ in slots.pairs], device=x.device).view(a, 1, 1, 1)
    tgt = torch.tensor([t for _, t in slots.pairs], device=x.device).view(a, 1, 1, 1)
    where = (src < 0) | (pred == src)
    goal = torch.where(where, tgt.expand_as(pred), pred)
    mask_p, pattern_p = slots.mask_p.requires_grad_(), slots.pattern_p.requires_grad_()
    mask, pattern = torch.sigmoid(mask_p), torch.sigmoid(pattern_p)  # [A,1,H,W], [A,3,H,W]
    x_adv = (1 - mask.unsqueeze(1)) * x + (mask * pattern).unsqueeze(1)
    logits = model(x_adv.flatten(0, 1))["out"]  # [A·b,K,H,W]
    pix = F.cross_entropy(logits, goal.flatten(0, 1), reduction="none").view(a, -1)
    w_in, w_out = where.reshape(a, -1).float(), (~where).reshape(a, -1).float()
    ce = (pix * w_in).sum(1) / w_in.sum(1).clamp_min(1) + (pix * w_out).sum(1) / w_out.sum(1).clamp_min(1)
    cost = torch.from_numpy(slots.schedule.cost).to(x.device, torch.float32)
    norm = mask.flatten(1).sum(1)
    loss = (ce + mask_penalty(mask, cost)).sum()  # rows are independent: each row's gradient is its own loss's
    grads = torch.autograd.grad(loss, [mask_p, pattern_p])
    slots.mask_p, slots.pattern_p = mask_p.detach(), pattern_p.detach()
    with torch.no_grad():
        hit = ((logits.argmax(1).view_as(where) == goal) & where).flatten(2).sum(2).double()  # [A,b]
        area = where.flatten(2).sum(2).double()
        counts = area > 0
        ok = counts & (hit >= pixel_share * area - 1e-9)
        attacked, counted = ok.sum(1).cpu().numpy(), counts.sum(1).cpu().numpy()
    slots.adam(grads, lr)
    return attacked, counted, norm.detach().double().cpu().numpy(), mask.detach()[:, 0]


@dataclass(frozen=True)
class EpochPlan:
    """How a candidate walks the clean subset: ``mini_batches`` steps of ``batch`` images per schedule
    decision.  Neural Cleanse (``per_epoch=True``): one epoch = every clean image once, in a fresh random
    order (ceil(n / batch) mini-batches, the last one shorter), and λ/early stop decide on the epoch's
    averages.  The cheaper setting (``per_epoch=False``): one decision per mini-batch of ``batch`` images."""

    n: int
    batch: int
    per_epoch: bool = True
    pixel_share: float = 1.0
    lr: float = 0.1  # Adam's learning rate
    candidate_batch: int = 16  # candidates optimised together (1 = one at a time)

    @property
    def mini_batches(self) -> int:
        return math.ceil(self.n / self.batch) if self.per_epoch else 1

    @property
    def images_per_epoch(self) -> int:
        return self.n if self.per_epoch else min(self.batch, self.n)


def _indices(slots: _Slots, plan: EpochPlan, phase: int, device: torch.device) -> torch.Tensor:
    """Each row's images for mini-batch ``phase`` of its epoch (a fresh permutation at phase 0)."""
    if phase == 0:
        slots.perms = [torch.randperm(plan.n, generator=g) for g in slots.gens]
    lo = phase * plan.batch
    hi = min(plan.n, lo + plan.batch)
    return torch.stack([p[lo:hi] for p in slots.perms]).to(device)


def _end_epoch(slots: _Slots, mask: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's success (attacked ÷ counted images) and mean mask norm go to the schedule; returns
    (converged, finished) rows."""
    success = slots.epoch[:, 0] / np.maximum(slots.epoch[:, 1], 1)
    norm = slots.epoch[:, 2] / steps
    improved, converged, finished = slots.schedule.update(success, norm)
    rows = torch.from_numpy(np.flatnonzero(improved)).to(mask.device)
    slots.best_mask[rows] = mask[rows]
    slots.best_success = np.where(improved, success, slots.best_success)
    slots.last = np.stack([norm, success], 1)
    for row in range(slots.size):
        slots.curves[row].append(float(norm[row]))
    slots.epoch[:] = 0
    return converged, finished


@dataclass(frozen=True)
class SearchJob:
    """What the search runs on: the clean images ``x_all [N,3,H,W]`` and the model's clean predictions
    ``pred_all [N,H,W]`` (the labels every unattacked pixel keeps), the candidates ``pairs`` (source −1 = any,
    target) and one seed per candidate."""

    x_all: torch.Tensor
    pred_all: torch.Tensor
    pairs: list[tuple[int, int]]
    seeds: list[int]


def search(model: nn.Module, job: SearchJob, cfg: ScheduleConfig, plan: EpochPlan, budget, meter,
           on_done=lambda result: None) -> tuple[list[CandidateResult], int]:
    """Optimise every candidate of ``job`` (in order, ``plan.candidate_batch`` at a time, refilling freed slots).

    Candidates finish only at the end of an epoch and new ones start at its beginning, so every candidate in
    the slots is at the same mini-batch of its epoch (each with its own image order).  Asks
    ``budget.spent(passes of the next step)`` before every step; when it says stop, the candidates in
    progress are abandoned (their masks have not converged: they do not count as covered).  Returns the
    finished candidates' results in candidate order and how many candidates were abandoned or never started.
    """
    x_all, pred_all, pairs, seeds = job.x_all, job.pred_all, job.pairs, job.seeds
    h, w = x_all.shape[-2:]
    slots = _Slots(cfg, h, w, x_all.device)
    queue = deque(range(len(pairs)))
    done: list[CandidateResult] = []
    phase = 0
    while queue or slots.size:
        while phase == 0 and queue and slots.size < plan.candidate_batch:
            i = queue.popleft()
            slots.add(i, pairs[i], seeds[i])
        idx = _indices(slots, plan, phase, x_all.device)
        if budget.spent(2 * idx.numel()):
            break
        t0 = time.perf_counter()
        attacked, counted, norm, mask = _step(model, slots, x_all, pred_all, idx, plan.lr, plan.pixel_share)
        slots.seconds += (time.perf_counter() - t0) / slots.size
        meter.forward += idx.numel()
        meter.backward += idx.numel()
        slots.passes += 2 * idx.shape[1]
        slots.epoch += np.stack([attacked, counted, norm], 1)
        phase = (phase + 1) % plan.mini_batches
        if phase:
            continue
        converged, finished = _end_epoch(slots, mask, plan.mini_batches)
        for row in np.flatnonzero(finished):
            done.append(slots.result(int(row), "converged" if converged[row] else "max_steps"))
            on_done(done[-1])
        slots.keep(~finished)
    done.sort(key=lambda r: r.index)
    return done, len(pairs) - len(done)
