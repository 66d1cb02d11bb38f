"""Trigger synthesis (Neural Cleanse, Wang et al., 2019) adapted to segmentation, with its cost made explicit.

For every candidate target the defense optimises a mask ``m`` (H×W, sigmoid-parametrised) and a pattern
``Δ`` (3×H×W) so that ``x' = (1−m)·x + m·Δ`` drives the model to the candidate on the clean subset, while
``λ‖m‖₁`` keeps the mask small (λ follows NC's schedule).  A real backdoor target needs a much smaller mask
than the others: the MAD anomaly index over the candidates' mask norms flags it.

Candidates:
- ``targets="image"``: K candidates ``("*", t)`` — every pixel → t;
- ``targets="pairs"``: K(K−1) candidates ``(s, t)`` — pixels the model predicts as s → t, all other pixels
  keep the model's clean prediction (the paper's O(K²) for fine-grained attacks);
- an arbitrary target map (BadNets-type attacks) has K^(H·W) candidates, which is only counted.

The point, after the seed paper (§2.2), is the cost: one candidate is timed and the counts are projected
for the data at hand and for ADE20K (K=150, 512×512), next to what ``budget_s`` actually covered.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import Budget, CostMeter, cross_entropy, predict_batches, report, to_input
from testbed.defense import DefenseContext, DefenseResult, Verdict

ADE20K_CLASSES = 150
ADE20K_SIZE = (512, 512)


def candidate_counts(num_classes: int, height: int, width: int) -> dict[str, float]:
    """How many candidate targets each attack family needs: K, K(K−1) and log10 of K^(H·W)."""
    k = int(num_classes)
    return {
        "image": k,
        "pairs": k * (k - 1),
        "log10_image": math.log10(k) if k > 0 else float("-inf"),
        "log10_pairs": math.log10(k * (k - 1)) if k > 1 else float("-inf"),
        "log10_maps": height * width * math.log10(k) if k > 0 else float("-inf"),
    }


def projected_cost(per_candidate_s: float, num_classes: int, height: int, width: int) -> dict[str, float]:
    """Seconds for all image-level and pair candidates, and log10 seconds for arbitrary target maps."""
    c = candidate_counts(num_classes, height, width)
    log_per = math.log10(per_candidate_s) if per_candidate_s > 0 else float("-inf")
    return {
        "per_candidate_seconds": per_candidate_s,
        "image_seconds": c["image"] * per_candidate_s,
        "pairs_seconds": c["pairs"] * per_candidate_s,
        "log10_maps_seconds": c["log10_maps"] + log_per,
    }


def anomaly_index(norms) -> np.ndarray:
    """MAD anomaly index ``|x − median| / (1.4826·MAD)`` (consistent with a normal's standard deviation).

    When MAD is 0 (most norms equal) any deviation is infinitely anomalous; a tiny floor keeps it finite.
    """
    x = np.asarray(norms, dtype=np.float64)
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    scale = max(1.4826 * mad, 1e-12 * max(abs(med), 1.0))
    return np.abs(x - med) / scale


def flag_small(norms, threshold: float = 2.0) -> np.ndarray:
    """Candidates whose norm is below the median with an anomaly index above ``threshold``."""
    x = np.asarray(norms, dtype=np.float64)
    return (x < np.median(x)) & (anomaly_index(x) > threshold)


@dataclass
class CandidateResult:
    source: str  # "*" for image-level
    target: str
    norm: float  # L1 norm of the best mask (the smallest one reaching the success threshold, else the last)
    success: float  # attack success of that mask on the clean batch
    reached: bool
    seconds: float
    forward: int
    backward: int
    mask: np.ndarray  # [H,W]


class TriggerSynthesis:
    """Neural-Cleanse-style trigger reverse engineering over image-level or (source, target) candidates.

    Parameters (defaults): ``targets`` ("image" | "pairs"), ``max_candidates`` (None = all), ``steps`` per
    candidate (100), ``batch_size`` (16 clean images per step), ``lr`` (0.1, Adam β=(0.5,0.9) as NC),
    ``init_cost`` λ₀ (1e-3), ``cost_up``/``cost_down`` (1.5, 1.5^1.5), ``patience`` (5 steps),
    ``success_threshold`` (0.99), ``anomaly_threshold`` (2.0).  Every candidate runs exactly ``steps``
    steps (no early stop) so that one candidate's cost predicts the others'.
    """

    name = "trigger-synthesis"
    uses_training_set = False

    def __init__(self, targets: str = "image", max_candidates: int | None = None, steps: int = 100, batch_size: int = 16,
                 lr: float = 0.1, init_cost: float = 1e-3, cost_up: float = 1.5, cost_down: float = 1.5 ** 1.5,
                 patience: int = 5, success_threshold: float = 0.99, anomaly_threshold: float = 2.0) -> None:
        if targets not in ("image", "pairs"):
            raise ValueError(f"targets must be 'image' or 'pairs', got {targets!r}")
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        self.targets, self.max_candidates, self.steps, self.batch_size = targets, max_candidates, int(steps), int(batch_size)
        self.lr, self.init_cost, self.cost_up, self.cost_down = float(lr), float(init_cost), float(cost_up), float(cost_down)
        self.patience, self.success_threshold, self.anomaly_threshold = int(patience), float(success_threshold), float(anomaly_threshold)

    # -- candidates ----------------------------------------------------------------------------------
    def candidates(self, model: nn.Module, ctx: DefenseContext) -> tuple[list[tuple[int, int]], int]:
        """Ordered (source, target) ids (source −1 = any) and how many pairs were skipped (source never predicted).

        Pairs are ordered by a cheap prior: the mean softmax mass of t on the pixels predicted as s (pairs
        the model already confuses come first), so a budget covers the likeliest pairs.
        """
        k = ctx.num_classes
        if self.targets == "image":
            return [(-1, t) for t in range(k)], 0
        mass = np.zeros((k, k))
        count = np.zeros(k)
        with torch.no_grad():
            for s in range(0, len(ctx.clean_images), 32):
                prob = model(to_input(ctx.clean_images[s : s + 32], ctx.device))["out"].softmax(1)
                pred = prob.argmax(1)
                onehot = F.one_hot(pred, k).permute(0, 3, 1, 2).double()
                mass += torch.einsum("bshw,bthw->st", onehot, prob.double()).cpu().numpy()
                count += onehot.sum((0, 2, 3)).cpu().numpy()
        pairs = [(s, t) for s in range(k) for t in range(k) if s != t and count[s] > 0]
        prior = {(s, t): mass[s, t] / count[s] for s, t in pairs}
        pairs.sort(key=lambda p: (-prior[p], p))
        return pairs, k * (k - 1) - len(pairs)

    # -- one candidate -------------------------------------------------------------------------------
    def synthesize(self, model: nn.Module, images: np.ndarray, clean_pred: np.ndarray, source: int, target: int,
                   device: torch.device, seed: int, ignore_index: int = 255) -> CandidateResult:
        """Optimise (mask, pattern) for one candidate; returns the smallest successful mask's norm."""
        t0 = time.perf_counter()
        n, h, w = clean_pred.shape
        g = torch.Generator().manual_seed(seed)
        mask_p = (torch.rand(1, 1, h, w, generator=g) * 2 - 1).to(device).requires_grad_()
        pattern_p = (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(device).requires_grad_()
        opt = torch.optim.Adam([mask_p, pattern_p], lr=self.lr, betas=(0.5, 0.9))
        x_all = to_input(images, device)
        pred_all = torch.from_numpy(clean_pred).long().to(device)
        cost, up, down, ok_steps = 0.0, 0, 0, 0
        best_norm, best_success, best_mask = math.inf, 0.0, None
        last_norm, last_success = math.inf, 0.0
        forward = backward = 0
        for step in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch_size, n),), generator=g).to(device)
            x, pred = x_all[idx], pred_all[idx]
            if source < 0:
                goal, where = torch.full_like(pred, target), torch.ones_like(pred, dtype=torch.bool)
            else:
                where = pred == source
                goal = torch.where(where, torch.full_like(pred, target), pred)
            mask = torch.sigmoid(mask_p)
            x_adv = (1 - mask) * x + mask * torch.sigmoid(pattern_p)
            logits = model(x_adv)["out"]
            if source < 0:
                ce = cross_entropy(logits, goal, ignore_index)
            else:  # source pixels → target and everything else unchanged, each term a mean of its own pixels
                ce = cross_entropy(logits, torch.where(where, goal, ignore_index), ignore_index) + cross_entropy(
                    logits, torch.where(where, ignore_index, goal), ignore_index)
            norm = mask.sum()
            loss = ce + cost * norm / (h * w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            forward += len(idx)
            backward += len(idx)
            with torch.no_grad():
                hit = (logits.argmax(1) == goal) & where
                success = float(hit.sum()) / max(int(where.sum()), 1)
                last_norm, last_success = float(norm), success
                if success >= self.success_threshold and float(norm) < best_norm:
                    best_norm, best_success, best_mask = float(norm), success, mask.detach()[0, 0].cpu().numpy()
            # NC's λ schedule: start at 0; once the attack works for `patience` steps set λ₀; then raise λ
            # while it keeps working and lower it while it does not.
            if cost == 0.0:
                ok_steps = ok_steps + 1 if success >= self.success_threshold else 0
                if ok_steps >= self.patience:
                    cost, up, down = self.init_cost, 0, 0
            else:
                if success >= self.success_threshold:
                    up, down = up + 1, 0
                else:
                    up, down = 0, down + 1
                if up >= self.patience:
                    cost, up = cost * self.cost_up, 0
                elif down >= self.patience:
                    cost, down = cost / self.cost_down, 0
        reached = best_mask is not None
        if not reached:
            best_norm, best_success = last_norm, last_success
            best_mask = torch.sigmoid(mask_p).detach()[0, 0].cpu().numpy()
        return CandidateResult("", "", best_norm, best_success, reached, time.perf_counter() - t0, forward, backward, best_mask)

    # -- the defense ---------------------------------------------------------------------------------
    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        budget, meter, device = Budget(ctx.budget_s), CostMeter(), ctx.device
        model = model.to(device).eval()
        images = ctx.clean_images
        n, h, w = len(images), int(images.shape[1]), int(images.shape[2])
        if n == 0:
            raise ValueError("trigger-synthesis needs a non-empty clean subset")
        params = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            clean_pred = predict_batches(model, images, device)
            meter.forward += n
            cands, skipped = self.candidates(model, ctx)
            if self.targets == "pairs":
                meter.forward += n
            total = len(cands)
            if self.max_candidates is not None:
                cands = cands[: max(0, int(self.max_candidates))]
            # warm-up: one forward+backward of a step's shape, so the first (timed) candidate does not pay
            # for lazy initialisation (kernel selection, allocator growth) that the others would not
            b = min(self.batch_size, n)
            x = to_input(images[:b], device).requires_grad_()
            model(x)["out"].sum().backward()
            meter.forward += b
            meter.backward += b
            results: list[CandidateResult] = []
            stopped_by_budget = False
            for i, (s, t) in enumerate(cands):
                if budget.exceeded():
                    stopped_by_budget = True
                    break
                r = self.synthesize(model, images, clean_pred, s, t, device, seed=ctx.seed * 1_000_003 + i, ignore_index=ctx.ignore_index)
                r.source, r.target = ("*" if s < 0 else ctx.classes[s]), ctx.classes[t]
                results.append(r)
                meter.forward += r.forward
                meter.backward += r.backward
                report(ctx.progress, (i + 1) / max(len(cands), 1), f"candidate {r.source}→{r.target}: mask L1 {r.norm:.1f}")
        finally:
            for p, req in zip(model.parameters(), params):
                p.requires_grad_(req)
        return self._result(ctx, results, total, skipped, len(cands), stopped_by_budget, budget, meter, h, w)

    def _result(self, ctx, results, total, skipped, planned, stopped_by_budget, budget, meter, h, w) -> DefenseResult:
        labels = [f"{r.source}->{r.target}" for r in results]
        norms = np.array([r.norm for r in results], dtype=np.float64)
        if len(results):
            index = anomaly_index(norms)
            flagged = flag_small(norms, self.anomaly_threshold)
        else:
            index, flagged = np.zeros(0), np.zeros(0, dtype=bool)
        small = norms < (np.median(norms) if len(norms) else 0)
        score = float(index[small].max()) if small.any() else 0.0
        suspected = [(r.source, r.target) for r, f in zip(results, flagged) if f]
        verdict = Verdict(backdoored=bool(flagged.any()), score=score, suspected=suspected)

        per_candidate = float(np.mean([r.seconds for r in results])) if results else float("nan")
        first = results[0].seconds if results else float("nan")
        k = ctx.num_classes
        ade_scale = (ADE20K_SIZE[0] * ADE20K_SIZE[1]) / (h * w)
        cost = {
            "targets": self.targets,
            "per_candidate_seconds": per_candidate,
            "first_candidate_seconds": first,
            "per_candidate_forward_passes": int(results[0].forward) if results else 0,
            "per_candidate_backward_passes": int(results[0].backward) if results else 0,
            "steps_per_candidate": self.steps,
            "counts": {"K": k, "H": h, "W": w, **candidate_counts(k, h, w)},
            "ade20k_counts": {"K": ADE20K_CLASSES, "H": ADE20K_SIZE[0], "W": ADE20K_SIZE[1],
                              **candidate_counts(ADE20K_CLASSES, *ADE20K_SIZE)},
            "projected": projected_cost(first, k, h, w) if results else None,
            "projected_ade20k": projected_cost(first * ade_scale, ADE20K_CLASSES, *ADE20K_SIZE) if results else None,
            "ade20k_pixel_scale": ade_scale,
            "candidates_in_mode": total,
            "candidates_skipped_no_source": skipped,
            "candidates_planned": planned,
            "candidates_run": len(results),
            "coverage_of_mode": len(results) / total if total else 0.0,
            "coverage_of_pairs": len(results) / max(k * (k - 1), 1) if self.targets == "pairs" else None,
            "budget_s": ctx.budget_s,
            "stopped_by_budget": stopped_by_budget,
            "elapsed_seconds": budget.elapsed(),
        }
        j = int(np.argmax(np.where(small, index, -1))) if small.any() else (int(np.argmin(norms)) if len(norms) else None)
        mask = None
        if j is not None:
            m = torch.from_numpy(results[j].mask)[None, None].float()
            if max(m.shape[-2:]) > 32:
                m = F.adaptive_avg_pool2d(m, (min(32, m.shape[-2]), min(32, m.shape[-1])))
            mask = np.round(m[0, 0].numpy().astype(np.float64), 4).tolist()
        details = {
            "cost": _jsonable(cost),
            "norms": {lab: float(v) for lab, v in zip(labels, norms)},
            "anomaly_index": {lab: float(v) for lab, v in zip(labels, index)},
            "reached": {lab: r.reached for lab, r in zip(labels, results)},
            "success": {lab: float(r.success) for lab, r in zip(labels, results)},
            "flagged": [lab for lab, f in zip(labels, flagged) if f],
            "mask_candidate": labels[j] if j is not None else None,
            "mask": mask,
            "stopped_by_budget": stopped_by_budget,
            "note": "fewer than 3 candidates: the MAD anomaly index is not meaningful" if len(results) < 3 else "",
        }
        return DefenseResult(verdict=verdict, cost=meter.cost(), details=details)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
