"""Blended trigger (Chen et al. 2017, "Targeted backdoor attacks on deep learning systems using data poisoning").

G(x) = (1−α)·x + α·t with a full-image pattern t: uniform noise drawn by seed (the default) or an image file
resized to the image.  With a small α (default 0.1) the trigger is hard to see; `testbed data info` reports
its PSNR/SSIM against the clean images.  It works with any label transform (FGBA presets, BadNets).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from testbed.attacks.base import Param, Trigger
from testbed.attacks.imageops import as_images, blend, check_alpha, check_image_path, read_kept, resize, split_alpha
from testbed.core.errors import ParamError

PATTERN_STREAM = 9
DEFAULT_ALPHA = 0.1


class BlendedTrigger(Trigger):
    """Full-image blend.  ``fit(image_size, seed)`` draws the noise pattern (or resizes the file) into ``t_``."""

    name = "blended"
    options_doc = {
        "alpha": Param("blend weight in (0, 1]: line trigger (default 1: a solid line) and blended trigger "
                       f"(default {DEFAULT_ALPHA}; also written --trigger blended:A)", type=float, metavar="A"),
        "pattern": Param("blended trigger: an image file as the pattern t, resized to the images (default: uniform "
                         "noise drawn with --seed)", metavar="FILE"),
    }

    @classmethod
    def from_options(cls, arg: str | None, alpha: float | None = None, pattern: str | None = None) -> "BlendedTrigger":
        if arg is not None:
            if alpha is not None:
                raise ParamError(f"the blend weight is given twice ({{trigger}} blended:{arg} and {{alpha}} {alpha:g}); "
                                 "give it once")
            try:
                alpha = float(arg)
            except ValueError:
                raise ParamError(f"{{trigger}} blended:{arg}: the weight after 'blended:' must be a number in (0, 1], "
                                 "e.g. blended:0.1") from None
            check_alpha(alpha, f"{{trigger}} blended:{arg}: ALPHA")
        return cls(alpha=DEFAULT_ALPHA if alpha is None else alpha, pattern=pattern)

    def __init__(self, alpha: float = DEFAULT_ALPHA, pattern: str | None = None) -> None:
        self.alpha = alpha
        self.pattern = pattern

    def _validate_params(self) -> None:
        check_alpha(self.alpha, "{alpha}")
        if self.pattern is not None:
            check_image_path(self.pattern, "pattern")  # read (and checked as an image) once: read_kept

    def check(self, image_size: Sequence[int]) -> None:
        """The parameters, and a pattern file read as an image (a zoo spec is checked before anything is written);
        this trigger stays unfitted, but keeps what it read for fit and describe."""
        self._validate_params()
        if self.pattern is not None:
            read_kept(self, self.pattern, "pattern")

    def fit(self, image_size: Sequence[int], seed: int = 0) -> "BlendedTrigger":
        self._validate_params()
        h, w = int(image_size[0]), int(image_size[1])
        self.seed_ = int(seed)
        if self.pattern is None:
            self.t_ = np.random.default_rng([self.seed_, PATTERN_STREAM]).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            self.weight_ = None
        else:
            self.t_, self.weight_ = split_alpha(resize(read_kept(self, self.pattern, "pattern")[0], (h, w)))
        return self

    def _fitted(self, image_size: Sequence[int]) -> None:
        self._validate_params()
        if not hasattr(self, "t_"):
            if self.pattern is None:
                raise RuntimeError("BlendedTrigger.fit(image_size, seed) draws the noise pattern; call it before apply")
            self.fit(image_size, 0)  # a file pattern needs no seed
        if self.t_.shape[:2] != tuple(image_size):
            raise ValueError(f"the pattern was fitted to {self.t_.shape[:2]} images, not {tuple(image_size)}")

    def apply(self, images: np.ndarray) -> np.ndarray:
        """G(x) for uint8 images [N,H,W,3] (or one [H,W,3]): ``floor((1−α)x + αt + 0.5)``."""
        images = as_images(images)
        self._fitted(images.shape[-3:-1])
        alpha = check_alpha(self.alpha, "{alpha}")
        a = alpha if self.weight_ is None else alpha * self.weight_
        return blend(images, self.t_, a)

    @property
    def spec(self) -> str:
        return f"blended:{check_alpha(self.alpha, '{alpha}'):g}"

    def describe(self, image_size: Sequence[int] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "type": "blended", "alpha": check_alpha(self.alpha, "{alpha}")}
        if self.pattern is None:
            d.update(pattern="noise", pattern_seed=getattr(self, "seed_", None))
        else:
            d.update(pattern="file", file=str(self.pattern), file_sha256=read_kept(self, self.pattern, "pattern")[1])
        return d

    def __repr__(self) -> str:
        return f"BlendedTrigger(alpha={self.alpha}, pattern={self.pattern!r})"
