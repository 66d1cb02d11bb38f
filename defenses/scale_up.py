"""SCALE-UP (Guo et al., ICLR 2023) adapted to segmentation: an input filter by scaled prediction consistency.

Amplifying every pixel value of an input (``x ↦ clip(n·x, 0, 1)``, n ∈ {3, 5, 7, 9, 11}) destroys a benign
image's evidence, so its prediction changes; a triggered input's prediction stays with the target, because
the trigger survives the scaling.  The paper's scaled prediction consistency (SPC) of an image is the share
of the amplified copies predicted as the original is.  For segmentation the consistency is per pixel — is
the amplified copy's argmax the unscaled argmax? — averaged over the pixels and over the scales, so SPC ∈
[0, 1] and higher = more suspicious.  The threshold comes from the clean subset (the paper's data-limited
setting): the empirical ``1 − frr`` quantile of the clean SPC scores (5%).  SPC is bounded by 1, so a normal
fitted to it (STRIP's rule, ``threshold_rule="normal"``) can put the threshold above every possible score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from testbed.defenses._features import Budget, CostMeter, report, to_input
from testbed.defenses.protocol import DefenseContext, DefenseResult
from testbed.defenses.strip import THRESHOLD_RULES, clean_threshold

SCALES = (3, 5, 7, 9, 11)


@torch.no_grad()
def spc(model: nn.Module, x: torch.Tensor, scales=SCALES) -> torch.Tensor:
    """Scaled prediction consistency of images ``x [B,3,H,W]`` in [0,1] → ``[B]``: the share of (pixel, scale)
    where ``argmax model(clip(n·x, 0, 1))`` equals ``argmax model(x)``."""
    pred = model(x)["out"].argmax(1)
    scaled = torch.cat([(x * n).clamp_(0, 1) for n in scales])  # [S·B,3,H,W], scale-major
    same = model(scaled)["out"].argmax(1).view(len(scales), *pred.shape) == pred.unsqueeze(0)
    return same.float().mean((0, 2, 3))


class ScaleUpScorer:
    """``scorer(images uint8 [N,H,W,3]) -> float [N]`` (SPC); counts its forward passes (per image)."""

    def __init__(self, model: nn.Module, device: torch.device, scales: tuple[int, ...], batch_size: int) -> None:
        self.model, self.device, self.scales = model, device, tuple(scales)
        self.per_forward = max(1, batch_size // (len(self.scales) + 1))
        self.forward = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {tuple(images.shape)}")
        self.model.eval()
        out = np.empty(len(images), dtype=np.float64)
        for s in range(0, len(images), self.per_forward):
            chunk = images[s : s + self.per_forward]
            out[s : s + len(chunk)] = spc(self.model, to_input(chunk, self.device), self.scales).double().cpu().numpy()
            self.forward += len(chunk) * (len(self.scales) + 1)
        return out


class ScaleUp:
    """Parameters (defaults): ``scales`` ([3, 5, 7, 9, 11], the paper's), ``frr`` (0.05) and ``threshold_rule``
    ("quantile") setting the threshold on the clean subset, ``batch_size`` (64 scaled images per forward)."""

    name = "scale-up"
    uses_training_set = False
    params_doc = {
        "scales": "pixel-value amplification factors (Guo et al.: 3, 5, 7, 9, 11); values are clipped to the valid range",
        "frr": "false rejection rate on the clean subset that sets the threshold",
        "threshold_rule": '"quantile": the empirical quantile of the clean SPC scores; "normal": a normal fitted to them',
        "batch_size": "images (originals and scaled copies) per forward pass",
    }

    def __init__(self, scales: tuple[int, ...] | list[int] = SCALES, frr: float = 0.05, threshold_rule: str = "quantile",
                 batch_size: int = 64) -> None:
        scales = tuple(scales)
        if not scales or any(isinstance(n, bool) or not float(n) > 1 for n in scales):
            raise ValueError(f"scales must be a non-empty list of factors above 1, got {list(scales)!r}")
        if not 0 <= frr < 1:
            raise ValueError(f"frr must be in [0, 1), got {frr!r}")
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be 'normal' or 'quantile', got {threshold_rule!r}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        self.scales, self.frr, self.threshold_rule, self.batch_size = scales, float(frr), threshold_rule, int(batch_size)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        n = len(ctx.clean_images)
        if n == 0:
            raise ValueError("scale-up needs a non-empty clean subset")
        scorer = ScaleUpScorer(model.to(ctx.device).eval(), ctx.device, self.scales, self.batch_size)
        per = len(self.scales) + 1
        scores, done, step = np.empty(n), 0, scorer.per_forward
        for s in range(0, n, step):
            if done >= 2 and budget.spent((min(n, s + step) - s) * per):  # a threshold needs two scores
                break
            scores[s : s + step] = scorer(ctx.clean_images[s : s + step])
            done = min(n, s + step)
            meter.forward = scorer.forward
            report(ctx.progress, done / n, f"SCALE-UP clean scores {done}/{n}")
        scores = scores[:done]
        threshold = clean_threshold(scores, self.frr, self.threshold_rule)
        details = {
            "clean_scores": scores.tolist(), "threshold": threshold, "frr_target": self.frr,
            "frr": float(np.mean(scores > threshold)), "threshold_rule": self.threshold_rule,
            "threshold_scores": int(done), "clean_images_scored": int(done), "scales": list(self.scales),
            "score": "per-pixel consistency of the scaled argmax with the unscaled argmax, mean over pixels and scales",
            **budget.summary(),
        }
        return DefenseResult(input_scores=scorer, threshold=threshold, cost=meter.cost(), details=details)
