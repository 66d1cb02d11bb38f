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

from testbed.defenses._features import Budget, CostMeter, check, check_clean, is_num, to_input
from testbed.defenses.protocol import DefenseContext, DefenseResult
from testbed.defenses.strip import check_filter, clean_threshold, score_clean
from testbed.training.heap import all_on_heap_on_cpu

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
        with self.heap():
            for s in range(0, len(images), self.per_forward):
                chunk = images[s : s + self.per_forward]
                x = to_input(chunk, self.device)
                out[s : s + len(chunk)] = spc(self.model, x, self.scales).double().cpu().numpy()
                self.forward += len(chunk) * (len(self.scales) + 1)
        return out

    def heap(self):
        """On CPU, blocks of every size from the C heap, reused from pass to pass (as STRIP's scorer)."""
        return all_on_heap_on_cpu(self.device)


class ScaleUp:
    """Parameters (defaults): ``scales`` ([3, 5, 7, 9, 11], the paper's), ``frr`` (0.05) and ``threshold_rule``
    ("quantile") setting the threshold on the clean subset, ``batch_size`` (64 scaled images per forward)."""

    name = "scale-up"
    paper = ('Guo et al.: SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled '
             'Prediction Consistency, ICLR 2023')
    reference = 'github.com/SCLBD/BackdoorBench defense/scale_up.py (a port; not read: implemented from the paper)'
    uses_training_set = False
    params_doc = {
        "scales": "pixel-value amplification factors (Guo et al.: 3, 5, 7, 9, 11); values are clipped to the valid range",
        "frr": "false rejection rate on the clean subset that sets the threshold",
        "threshold_rule": '"quantile": the empirical quantile of the clean SPC scores; "normal": a normal fitted to them',
        "batch_size": "images (originals and scaled copies) per forward pass",
    }

    def __init__(self, scales: tuple[int, ...] | list[int] = SCALES, frr: float = 0.05, threshold_rule: str = "quantile",
                 batch_size: int = 64) -> None:
        self.scales, self.frr, self.threshold_rule, self.batch_size = scales, frr, threshold_rule, batch_size

    def check_params(self) -> None:
        scales = self.scales
        check(isinstance(scales, (list, tuple)) and len(scales) > 0 and all(is_num(n) and n > 1 for n in scales),
              "scales", "a non-empty list of factors above 1", scales)
        check_filter(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        check_clean(ctx, self.name)
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        scorer = ScaleUpScorer(model.to(ctx.device).eval(), ctx.device, tuple(self.scales), self.batch_size)
        with scorer.heap():  # one kept heap for all the clean chunks, not one per call
            scores = score_clean(scorer, ctx, budget, meter, per_image=len(self.scales) + 1, label="SCALE-UP")
        threshold = clean_threshold(scores, self.frr, self.threshold_rule)
        details = {
            "clean_scores": scores.tolist(), "threshold": threshold, "frr_target": self.frr,
            "frr": float(np.mean(scores > threshold)), "threshold_rule": self.threshold_rule,
            "threshold_scores": len(scores), "clean_images_scored": len(scores), "scales": list(self.scales),
            "score": "per-pixel consistency of the scaled argmax with the unscaled argmax, mean over pixels and scales",
            **budget.summary(),
        }
        return DefenseResult(input_scores=scorer, threshold=threshold, cost=meter.cost(), details=details)
