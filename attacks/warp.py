"""WaNet-style warping trigger (Nguyen & Tran, ICLR 2021, "WaNet – Imperceptible warping-based backdoor attack").

The trigger is a fixed, smooth warping field, drawn once by seed exactly as WaNet draws it: a ``k×k×2`` grid of
uniform values in [−1, 1], divided by its mean absolute value, upsampled bicubically (align_corners) to the
image size, and added to the identity sampling grid with strength ``s``:

    grid = clamp(identity + s · field / (W, H), −1, 1)      G(x) = grid_sample(x, grid)  (bilinear)

in grid_sample's normalised coordinates (−1 … 1 across the image), so a pixel moves by about
``s · |field| / 2`` px (0.25 px on average at WaNet's s = 0.5); the result is rounded half up to uint8.

**Noise mode** (WaNet's): ``warp_noise = R`` adds ``round(R · P)`` extra training samples (P = poisoned
samples), drawn by seed among the unpoisoned ones, warped with the trigger's grid plus per-pixel uniform
noise in ±1/(W, H) (about ±0.5 px), and keeping their true labels.  They teach the model that a warp that is
*not exactly* the trigger means nothing.  The poisoner stores them as ``/train/noise_index`` (with
``/train/noise_original_images``); they are not in ``/train/poison_index`` and never in the defender's
clean subset.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from testbed.attacks.base import Param, Trigger
from testbed.attacks.imageops import as_images
from testbed.attacks.selection import round_half_up
from testbed.core.errors import ParamError
from testbed.core.paramtypes import is_int, is_num

FIELD_STREAM, NOISE_STREAM = 10, 11
DEFAULT_GRID, DEFAULT_STRENGTH = 4, 0.5


def _number(value: Any, param: str, lo: float, open_lo: bool) -> float:
    ok = is_num(value)
    if not ok or (value <= lo if open_lo else value < lo):
        raise ParamError(f"{{{param}}} must be a number {'>' if open_lo else '>='} {lo:g}, got {value!r}")
    return float(value)


def control_field(k: int, seed: int) -> np.ndarray:
    """float64 ``[2, k, k]``: uniform in [−1, 1], divided by its mean absolute value (WaNet's ``ins``)."""
    ins = np.random.default_rng([int(seed), FIELD_STREAM]).random((2, k, k)) * 2 - 1
    return ins / np.mean(np.abs(ins))


def identity_grid(h: int, w: int) -> np.ndarray:
    """float64 ``[H, W, 2]``: grid_sample's (x, y) of every pixel centre with align_corners=True."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return np.stack([xs, ys], axis=-1)


def grid_sample(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """uint8 ``[N,H,W,3]`` sampled bilinearly at ``grid`` (``[H,W,2]`` or ``[N,H,W,2]``), rounded half up."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float64)
    g = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float64))
    g = g.expand(x.shape[0], *g.shape) if g.ndim == 3 else g
    out = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


class WarpTrigger(Trigger):
    """Fixed smooth warp.  ``fit(image_size, seed)`` draws the field: ``grid_`` ([H,W,2], normalised)."""

    name = "warp"
    options_doc = {
        "warp_grid": Param(f"warp trigger: control-grid size k (default {DEFAULT_GRID}, WaNet's)", type=int, metavar="K"),
        "warp_strength": Param(f"warp trigger: strength s (default {DEFAULT_STRENGTH}, WaNet's: pixels move about s/2 px "
                               "on average)", type=float, metavar="S"),
        "warp_noise": Param("warp trigger: WaNet's noise mode, R extra label-keeping training samples per poisoned "
                            "sample warped with a randomly perturbed field (default 0: off; WaNet uses 2)",
                            type=float, metavar="R"),
    }

    @classmethod
    def from_options(cls, arg: str | None, warp_grid: int | None = None, warp_strength: float | None = None,
                     warp_noise: float | None = None) -> "WarpTrigger":
        if arg:
            raise ParamError(f"--trigger warp takes no argument (got warp:{arg}); set {{warp_grid}}, {{warp_strength}}, "
                             "{warp_noise}")
        return cls(grid=DEFAULT_GRID if warp_grid is None else warp_grid,
                   strength=DEFAULT_STRENGTH if warp_strength is None else warp_strength,
                   noise=0.0 if warp_noise is None else warp_noise)

    def __init__(self, grid: int = DEFAULT_GRID, strength: float = DEFAULT_STRENGTH, noise: float = 0.0) -> None:
        self.grid = grid
        self.strength = strength
        self.noise = noise

    def _validate_params(self) -> tuple[int, float, float]:
        """``(grid, strength, noise)`` checked, as int and floats."""
        grid = self.grid
        if not is_int(grid, 2):
            raise ParamError(f"{{warp_grid}} must be an integer >= 2 (WaNet uses 4), got {grid!r}")
        return (int(grid), _number(self.strength, "warp_strength", 0, open_lo=True),
                _number(self.noise, "warp_noise", 0, open_lo=False))

    def fit(self, image_size: Sequence[int], seed: int = 0) -> "WarpTrigger":
        h, w = int(image_size[0]), int(image_size[1])
        self.check(image_size)
        grid, strength, _ = self._validate_params()
        self.seed_ = int(seed)
        ins = torch.from_numpy(control_field(grid, seed))[None]
        field = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0).numpy()
        self.field_ = field  # [H, W, 2]: x and y offsets before scaling
        self.grid_ = np.clip(identity_grid(h, w) + strength * field / np.array([w, h]), -1, 1)
        moved = self.displacement_px()
        if moved.max() > min(h, w):
            raise ParamError(f"{{warp_strength}} {strength:g} moves pixels by up to {moved.max():.0f} px, more than "
                             f"the {h}x{w} image; use a smaller strength (WaNet: {DEFAULT_STRENGTH})")
        return self

    def displacement_px(self) -> np.ndarray:
        """float ``[H, W]``: how far each output pixel samples from its own position, in pixels (unclamped)."""
        h, w = self.field_.shape[:2]
        strength = self._validate_params()[1]
        dx = strength * self.field_[..., 0] / w * (w - 1) / 2
        dy = strength * self.field_[..., 1] / h * (h - 1) / 2
        return np.hypot(dx, dy)

    def check(self, image_size: Sequence[int]) -> None:
        grid, strength, _ = self._validate_params()
        h, w = int(image_size[0]), int(image_size[1])
        if grid > min(h, w):
            raise ParamError(f"{{warp_grid}} {grid} is larger than the {h}x{w} image; use a smaller control grid")
        # before fit: the control values have mean |·| = 1, so a pixel moves s/2 px on average
        if strength * (min(h, w) - 1) / (2 * min(h, w)) > min(h, w):
            raise ParamError(f"{{warp_strength}} {strength:g} moves pixels by more than the {h}x{w} image on "
                             f"average; use a smaller strength (WaNet: {DEFAULT_STRENGTH})")

    def _fitted(self, image_size: Sequence[int]) -> None:
        self._validate_params()
        if not hasattr(self, "grid_"):
            raise RuntimeError("WarpTrigger.fit(image_size, seed) draws the warping field; call it before apply")
        if self.grid_.shape[:2] != tuple(image_size):
            raise ValueError(f"the field was fitted to {self.grid_.shape[:2]} images, not {tuple(image_size)}")

    def apply(self, images: np.ndarray) -> np.ndarray:
        """G(x): uint8 images [N,H,W,3] (or one [H,W,3]) resampled through the fixed field."""
        images = as_images(images)
        self._fitted(images.shape[-3:-1])
        out = grid_sample(images.reshape(-1, *images.shape[-3:]), self.grid_)
        return out.reshape(images.shape)

    def noise_count(self, poisoned: int, available: int) -> int:
        noise = self._validate_params()[2]
        count = round_half_up(noise * poisoned)
        if count > available:
            raise ParamError(f"{{warp_noise}} {noise:g} asks for {count} noise samples but only {available} training "
                             "samples are not poisoned; lower {warp_noise} or {rate}")
        return count

    def apply_noise(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Noise samples: the trigger's grid plus per-pixel uniform noise in ±1/(W, H), seeded per training row."""
        images = np.asarray(images)
        self._fitted(images.shape[1:3])
        h, w = images.shape[1:3]
        grids = np.empty((images.shape[0], h, w, 2))
        for i, row in enumerate(np.asarray(index)):
            ins = np.random.default_rng([self.seed_, NOISE_STREAM, int(row)]).random((h, w, 2)) * 2 - 1
            grids[i] = np.clip(self.grid_ + ins / np.array([w, h]), -1, 1)
        return grid_sample(images, grids)

    @property
    def spec(self) -> str:
        return "warp"

    def describe(self, image_size: Sequence[int] | None = None) -> dict[str, Any]:
        grid, strength, noise = self._validate_params()
        d: dict[str, Any] = {"spec": "warp", "type": "warp", "grid": grid, "strength": strength,
                             "noise": noise, "field_seed": getattr(self, "seed_", None)}
        if hasattr(self, "field_"):
            moved = self.displacement_px()
            d.update(mean_displacement_px=float(moved.mean()), max_displacement_px=float(moved.max()))
        return d

    def __repr__(self) -> str:
        return f"WarpTrigger(grid={self.grid}, strength={self.strength}, noise={self.noise})"
