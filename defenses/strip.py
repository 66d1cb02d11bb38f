"""STRIP (Gao et al., 2019) adapted to segmentation: an input filter.

A trigger dominates whatever it is superimposed with, so the prediction of a triggered input stays
confident (low entropy) under strong perturbation, while a clean input's prediction falls apart.  Each input
is superimposed with ``n_overlays`` (100, as the paper and the WaNet release's STRIP) clean images drawn at
random from the trusted subset — by default STRIP's additive superimposition (``cv2.addWeighted(bg, 1,
overlay, 1, 0)``: the sum, saturated at 255) — the per-pixel softmax entropy is averaged over the overlays,
and the image score is the mean entropy of the lowest-entropy ``fraction`` of pixels (a trigger may control
only part of the image), negated so that higher = more suspicious.  The threshold is Gao et al.'s: a normal
distribution fitted to the clean scores, cut at the preset false rejection rate (``frr`` = 1%).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.defenses._features import Budget, CostMeter, check, check_clean, is_int, is_num, report, to_input
from testbed.defenses.protocol import DefenseContext, DefenseResult
from testbed.training.heap import all_on_heap_on_cpu


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the per-pixel softmax: logits ``[N,K,H,W]`` → ``[N,H,W]``."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def image_score(entropy: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """``−mean`` of the lowest-entropy ``fraction`` of pixels of each map ``[N,H,W]`` → ``[N]``."""
    flat = entropy.flatten(1)
    k = max(1, int(math.ceil(fraction * flat.shape[1])))
    return -flat.topk(k, dim=1, largest=False).values.mean(1)


def blend_(x: torch.Tensor, overlays: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """Superimpose images ``x [B,3,H,W]`` (in [0,1]) on ``overlays [B,N,3,H,W]`` (raw 0..255, overwritten in
    place — no extra copies of the B·N batch): ``blend`` = α·x + (1−α)·overlay; ``add`` = STRIP's saturating
    sum min(1, x + overlay) (cv2.addWeighted(x, 1, overlay, 1, 0) on uint8 images, exactly: a sum of two
    uint8 values needs no rounding).  Returns ``[B·N,3,H,W]``."""
    x = x.unsqueeze(1)
    if mode == "add":
        overlays.div_(255.0).add_(x).clamp_(max=1.0)
    else:
        overlays.mul_((1.0 - alpha) / 255.0).add_(x, alpha=alpha)
    return overlays.flatten(0, 1)


def overlay_indices(image: np.ndarray, pool_size: int, n: int, seed: int, exclude: int | None = None) -> np.ndarray:
    """The overlays for one image: seeded by ``seed`` and the image's bytes, so an image's score does not
    depend on the batch it comes in.  ``exclude`` (an image scoring itself) is left out when possible."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(np.ascontiguousarray(image).tobytes())])
    pool = np.arange(pool_size)
    if exclude is not None and pool_size > 1:
        pool = pool[pool != exclude]
    return rng.choice(pool, size=n, replace=len(pool) < n)


class StripScorer:
    """``scorer(images uint8 [N,H,W,3]) -> float [N]``: all overlays of several images in one forward.

    ``settings`` is the :class:`Strip` defense (its ``n_overlays``, ``fraction``, ``mode``, ``alpha`` and
    ``batch_size``); the overlays come from ``pool`` and are drawn with ``seed``."""

    def __init__(self, model: nn.Module, pool: np.ndarray, device: torch.device, settings: "Strip", seed: int) -> None:
        self.model, self.device = model, device
        self.pool = torch.from_numpy(np.array(pool)).to(device).permute(0, 3, 1, 2)  # uint8 [P,3,H,W]
        self.n, self.fraction = int(settings.n_overlays), float(settings.fraction)
        self.mode = "blend" if settings.mode == "mean" else settings.mode
        self.alpha, self.seed = float(settings.alpha), seed
        self.per_forward = max(1, int(settings.batch_size) // self.n)  # images per forward pass
        self.forward = 0

    @torch.no_grad()
    def __call__(self, images: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[1:3]) != tuple(self.pool.shape[-2:]):
            raise ValueError(f"images are {images.shape[1:3]} but the clean overlays are {tuple(self.pool.shape[-2:])}")
        self.model.eval()
        with self.heap():
            return self._scores(images, exclude)

    def heap(self):
        """On CPU, the forward passes' blocks — over glibc's largest mmap threshold at CamVid's size — come from
        the C heap and are reused, not mapped and faulted in afresh each pass (:func:`all_on_heap`; the same
        batches, so the same scores).  :meth:`Strip.run` holds it over the clean scores, each call over its own."""
        return all_on_heap_on_cpu(self.device)

    def _scores(self, images: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        out = np.empty(len(images), dtype=np.float64)
        for s in range(0, len(images), self.per_forward):
            chunk = images[s : s + self.per_forward]
            b = len(chunk)
            idx = np.stack([overlay_indices(chunk[i], len(self.pool), self.n, self.seed,
                                            None if exclude is None else int(exclude[s + i])) for i in range(b)])
            x = to_input(chunk, self.device)
            over = self.pool[torch.from_numpy(idx).to(self.device)].float()  # [b,N,3,H,W], 0..255
            mixed = blend_(x, over, self.mode, self.alpha)
            logits = self.model(mixed)["out"]  # [b·N,K,H,W]
            self.forward += len(mixed)
            # entropy image by image: the N overlays of one image stay in cache (≈1.6× faster than all at once)
            ent = torch.stack([pixel_entropy(part).mean(0) for part in logits.split(self.n)])  # [b,H,W]
            out[s : s + b] = image_score(ent, self.fraction).double().cpu().numpy()
        return out


MODES = ("add", "blend")
THRESHOLD_RULES = ("normal", "quantile")


def clean_threshold(scores: np.ndarray, frr: float, rule: str = "normal") -> float:
    """The score above which an input is rejected, from the clean scores and the preset false rejection rate.

    ``normal`` (Gao et al.): a normal distribution fitted to the clean scores (mean, sample standard
    deviation), cut at its ``1 − frr`` quantile; ``quantile``: the empirical ``1 − frr`` quantile.  With
    ``frr = 0`` every clean score is accepted (the largest one)."""
    s = np.asarray(scores, dtype=np.float64)
    if frr == 0:
        return float(s.max())
    if rule == "quantile" or len(s) < 2:
        return float(np.quantile(s, 1.0 - frr))
    sd = float(s.std(ddof=1))
    return float(NormalDist(float(s.mean()), sd).inv_cdf(1.0 - frr)) if sd > 0 else float(s.mean())


def check_filter(obj) -> None:
    """The parameters both input filters share (``frr``, ``threshold_rule``, ``batch_size``)."""
    check(is_num(obj.frr) and 0 <= obj.frr < 1, "frr", "a number in [0, 1)", obj.frr)
    check(obj.threshold_rule in THRESHOLD_RULES, "threshold_rule", " or ".join(map(repr, THRESHOLD_RULES)),
          obj.threshold_rule)
    check(is_int(obj.batch_size, 1), "batch_size", "an integer >= 1", obj.batch_size)


def score_clean(scorer, ctx: DefenseContext, budget: Budget, meter: CostMeter, per_image: int, label: str,
                leave_one_out: bool = False) -> np.ndarray:
    """An input filter's scores of the clean subset, ``scorer.per_forward`` images at a time, within the budget
    (``per_image`` passes each; the first two are always scored: a threshold needs scores).  ``leave_one_out``:
    each clean image is scored against overlays from the *other* clean images (STRIP)."""
    n = len(ctx.clean_images)
    scores, done, step = np.empty(n), 0, scorer.per_forward
    for s in range(0, n, step):
        stop = min(n, s + step)
        if done >= 2 and budget.spent((stop - s) * per_image):
            break
        chunk = ctx.clean_images[s:stop]
        scores[s:stop] = scorer(chunk, exclude=np.arange(s, stop)) if leave_one_out else scorer(chunk)
        done = stop
        meter.forward = scorer.forward
        report(ctx.progress, done / n, f"{label} clean scores {done}/{n}")
    return scores[:done]


@dataclass(eq=False)
class Strip:
    """Entropy-based input filter.

    Parameters (defaults): ``n_overlays`` (100, as Gao et al.), ``fraction`` of lowest-entropy pixels (0.1),
    ``frr`` on the clean subset (0.01, Gao et al.'s 1%), ``threshold_rule`` ("normal": Gao et al.'s normal
    fit; "quantile": the empirical quantile), ``mode`` ("add": STRIP's saturating sum; "blend": α·x +
    (1−α)·overlay with ``alpha`` 0.5), ``batch_size`` (256 superimposed images per forward pass).
    """

    name = "strip"
    paper = 'Gao et al.: STRIP: A Defence Against Trojan Attacks on Deep Neural Networks, ACSAC 2019'
    reference = 'github.com/VinAIResearch/Warping-based_Backdoor_Attack-release defenses/STRIP (STRIP.py, config.py)'
    uses_training_set = False
    params_doc = {
        "n_overlays": "clean images superimposed on each input (Gao et al.: 100)",
        "fraction": "share of lowest-entropy pixels averaged into the image score",
        "frr": "false rejection rate on the clean subset that sets the threshold (Gao et al.: 0.01)",
        "threshold_rule": '"normal": a normal fitted to the clean scores (Gao et al.); "quantile": their empirical quantile',
        "mode": '"add": STRIP\'s saturating sum x + overlay (cv2.addWeighted 1, 1); "blend": alpha*x + (1-alpha)*overlay',
        "alpha": 'weight of the input in mode "blend"',
        "batch_size": "superimposed images per forward pass",
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``); checked in check_params
    n_overlays: int = 100
    fraction: float = 0.1
    frr: float = 0.01
    threshold_rule: str = "normal"
    mode: str = "add"  # "mean": this filter's earlier name for "blend", still accepted
    alpha: float = 0.5
    batch_size: int = 256

    def check_params(self) -> None:
        check(is_int(self.n_overlays, 1), "n_overlays", "an integer >= 1", self.n_overlays)
        check(is_num(self.fraction) and 0 < self.fraction <= 1, "fraction", "a number in (0, 1]", self.fraction)
        check(self.mode in (*MODES, "mean"), "mode", "'add' or 'blend'", self.mode)
        check(is_num(self.alpha) and 0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)
        check_filter(self)

    def scorer(self, model: nn.Module, ctx: DefenseContext) -> StripScorer:
        return StripScorer(model.to(ctx.device).eval(), ctx.clean_images, ctx.device, self, ctx.seed)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        self.check_params()
        n = check_clean(ctx, self.name)
        meter = CostMeter()
        budget = Budget.for_context(ctx, meter)
        scorer = self.scorer(model, ctx)
        # every clean image is scored against overlays drawn from the *other* clean images (leave-one-out),
        # so the threshold sees the same kind of overlays a test input gets
        with scorer.heap():  # one kept heap for all the clean chunks, not one per call
            scores = score_clean(scorer, ctx, budget, meter, self.n_overlays, "STRIP", leave_one_out=True)
        threshold = clean_threshold(scores, self.frr, self.threshold_rule)
        return DefenseResult(input_scores=scorer, threshold=threshold, cost=meter.cost(),
                             details={**self._details(scores, threshold, n, scorer), **budget.summary()})

    def _details(self, scores: np.ndarray, threshold: float, n: int, scorer: StripScorer) -> dict:
        pool = max(n - 1, 1)  # a clean image's overlays leave it out; a test input draws from all n
        short = pool < self.n_overlays
        return {
            "clean_scores": scores.tolist(),
            "frr": float(np.mean(scores > threshold)),
            "frr_target": self.frr,
            "threshold": threshold,
            "threshold_rule": self.threshold_rule,
            "threshold_scores": int(len(scores)),
            "mode": scorer.mode,
            "n_overlays": self.n_overlays,
            "overlay_pool": n,
            "overlays_repeat": bool(short),
            "images_per_forward": scorer.per_forward,
            "clean_images_scored": int(len(scores)),
            "threshold_data": "all of the clean subset, leave-one-out overlays",
            "note": (f"the clean subset holds {n} images, fewer than n_overlays={self.n_overlays}: overlays repeat "
                     f"(drawn with replacement from {n} images, {pool} for a clean image), and the threshold rests on "
                     f"{len(scores)} clean scores" if short else ""),
        }
