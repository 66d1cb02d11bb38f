"""A training run's settings (:class:`TrainConfig`) and their validation, kept apart from the loop.

Why apart: the zoo spec, the CLI and the defense runner build and check configs without training anything,
and ``config.json["train"]`` is this dataclass as a dict, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed import models
from testbed.core.errors import UserError, did_you_mean

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("poly", "onecycle")
DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.02}


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in ``config.json`` so a run can be repeated exactly.

    ``lr=None`` takes the optimizer's default (AdamW 2e-3, SGD 0.02), meant for the tiny models on 64×64
    synthetic scenes.  ``amp``/``channels_last`` ``"auto"`` means on for CUDA; ``amp`` may
    also name the dtype, ``"bf16"`` or ``"fp16"`` (the latter with a GradScaler).  ``precision`` (``auto``,
    ``fp32``, ``bf16``) is the CPU's: ``auto`` is fp32 until bf16's quality is shown equal to fp32's, then bf16
    autocast on a CPU with native bf16 (AVX512-BF16 or AMX-BF16); see :func:`testbed.training.loop.resolve_precision`.
    ``batch_size`` is per process (as in torchvision's references) under ``torchrun``.
    """

    model: str = "deeplabv3_tiny"
    epochs: int = 10
    batch_size: int = 16
    lr: float | None = None
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    warmup: float = 0.1  # fraction of all steps spent warming up the learning rate
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    amp: bool | str = "auto"
    channels_last: bool | str = "auto"
    precision: str = "auto"  # CPU arithmetic: auto = bf16 where the CPU has native bf16, else fp32
    aux_loss: bool = False
    aux_weight: float = 0.5
    num_workers: int = 0
    hflip: bool = True
    log_every: int = 20
    backbone_weights: str | None = None
    val_every: int = 0  # a learning-curve point every K epochs and after the last (0 = none); see training/curve.py

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).lower()
        self.schedule = str(self.schedule).lower()
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of: {', '.join(SCHEDULES)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        checks = [
            (_is_int(self.epochs) and self.epochs >= 1, f"--epochs must be an integer >= 1, got {self.epochs!r}"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"--batch-size must be an integer >= 1, got {self.batch_size!r}"),
            (_finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}"),
            (_finite(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum!r}"),
            (_finite(self.warmup) and 0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup!r}"),
            (_finite(self.aux_weight) and self.aux_weight >= 0, f"--aux-weight must be >= 0, got {self.aux_weight!r}"),
            (_is_int(self.num_workers) and self.num_workers >= 0, f"--workers must be >= 0, got {self.num_workers!r}"),
            (_is_int(self.log_every) and self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every!r}"),
            (_is_int(self.seed) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed!r}"),
            (_is_int(self.val_every) and self.val_every >= 0,
             f"--val-every must be an integer >= 0 (0 = no learning curve), got {self.val_every!r}"),
        ]
        checks += [  # booleans are booleans: hflip = "no" in a zoo spec must not mean "flip"
            (isinstance(self.hflip, bool), f"hflip must be true or false (--no-hflip), got {self.hflip!r}"),
            (isinstance(self.aux_loss, bool), f"aux_loss must be true or false (--aux-loss), got {self.aux_loss!r}"),
            (isinstance(self.amp, (bool, str)), f"amp must be true, false, \"auto\", \"bf16\" or \"fp16\", got {self.amp!r}"),
            (isinstance(self.channels_last, (bool, str)),
             f"channels_last must be true, false or \"auto\", got {self.channels_last!r}"),
            (self.backbone_weights is None or isinstance(self.backbone_weights, str),
             f"backbone_weights must be \"imagenet\" or a file path, got {self.backbone_weights!r}"),
            (isinstance(self.model, str), f"model must be a model name, got {self.model!r}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        for name in ("amp", "channels_last"):
            value = getattr(self, name)
            if isinstance(value, str):
                words = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
                if name == "amp":
                    words.update(bf16="bf16", fp16="fp16")
                value = words.get(value.lower())
                if value is None:
                    raise UserError(f"{name} must be one of {', '.join(words)}, got {getattr(self, name)!r}")
                setattr(self, name, value)
        if self.model not in models.available():
            raise UserError(f"unknown model {self.model!r}{did_you_mean(self.model, models.available())}; "
                            f"available: {', '.join(models.available())}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``config.json["train"]``; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)
