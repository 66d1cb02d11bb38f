"""The defense protocol (docs/writing-a-defense.md): what a defense receives, and what it may return.

A defense is any object with a ``name`` and ``run(model, ctx) -> DefenseResult``.  The context holds
exactly what the threat model allows: the suspicious model, a small trusted clean subset and, for
training-set defenses, a read-only view of the (possibly poisoned) training set.  It never holds the
trigger, the attack parameters, the poison indices or the attacked test set.

The protocol lives in the defenses package, beside the defenses that implement it;
``from testbed.defense import Defense, DefenseContext, DefenseResult`` is its stable public path.
This module imports numpy, torch and the scorer's input conversion.  Python imports a package before its
modules, so importing it also loads the built-in defenses (the package's ``__init__``); none of them is run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from testbed.scoring.scorer import to_input


class ReadOnlyArray:
    """A read-only view of a training-set array that loads lazily (the training set may be large)."""

    def __init__(self, loader: Callable[[Any], np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._loader = loader
        self.shape = shape
        self.dtype = dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        out = np.array(self._loader(index))
        out.setflags(write=False)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class TrainingSet:
    """The training set as the defender sees it: images and labels, nothing about which are poisoned."""

    images: ReadOnlyArray  # uint8 [N,H,W,3]
    labels: ReadOnlyArray  # uint8 [N,H,W]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class DefenseContext:
    """Everything a defense may use.  Frozen: a defense cannot add what the runner did not give it."""

    clean_images: np.ndarray  # uint8 [C,H,W,3], the defender's trusted clean subset
    clean_labels: np.ndarray  # uint8 [C,H,W]
    classes: tuple[str, ...]
    device: torch.device
    seed: int = 0
    budget_s: float | None = None  # wall-clock budget in seconds (None = unlimited)
    budget_passes: int | None = None  # compute budget: per-image forward + backward passes (None = unlimited)
    train: TrainingSet | None = None  # only for training-set defenses (``uses_training_set = True``)
    image_size: tuple[int, int] = (0, 0)
    ignore_index: int = 255
    progress: Callable[[float, str], None] = lambda fraction, message: None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def clean_loader(self, batch_size: int = 16, shuffle: bool = False) -> torch.utils.data.DataLoader:
        """Batches of (float images [B,3,H,W] in [0,1], int64 labels [B,H,W]) from the clean subset."""
        x = to_input(self.clean_images, "cpu")
        y = torch.from_numpy(np.ascontiguousarray(self.clean_labels)).long()
        g = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g
        )


@dataclass
class Verdict:
    """A detection defense's answer: is the model backdoored?"""

    backdoored: bool
    score: float  # higher = more suspicious (e.g. an anomaly index)
    suspected: list[tuple[str, str]] = field(default_factory=list)  # (source, target) class pairs; source "*" = any
    status: str | None = None  # "backdoored" | "clean" | "inconclusive" (None: from ``backdoored``)
    coverage: float | None = None  # share of the candidate space the search covered (1.0 = all)

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = "backdoored" if self.backdoored else "clean"
        if self.status not in ("backdoored", "clean", "inconclusive"):
            raise ValueError(f"verdict status must be backdoored, clean or inconclusive, got {self.status!r}")


@dataclass
class Cost:
    seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0


@dataclass
class DefenseResult:
    """Any subset of: a repaired model, an input filter, training samples to drop, a verdict."""

    model: nn.Module | None = None
    input_scores: Callable[[np.ndarray], np.ndarray] | None = None  # uint8 [N,H,W,3] -> float [N]; higher = suspicious
    threshold: float | None = None  # inputs with score > threshold are rejected
    flagged_train: np.ndarray | None = None  # training indices to drop before retraining
    verdict: Verdict | None = None
    cost: Cost = field(default_factory=Cost)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able

    def kinds(self) -> list[str]:
        out = []
        if self.model is not None:
            out.append("repair")
        if self.input_scores is not None:
            out.append("filter")
        if self.flagged_train is not None:
            out.append("retrain")
        if self.verdict is not None:
            out.append("verdict")
        return out


@runtime_checkable
class Defense(Protocol):
    """Implement ``name`` and ``run``; set ``uses_training_set = True`` to receive ``ctx.train``."""

    name: str

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult: ...


def replace(ctx: DefenseContext, **changes: Any) -> DefenseContext:
    return dataclasses.replace(ctx, **changes)
