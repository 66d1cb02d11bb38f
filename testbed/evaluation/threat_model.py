"""The threat-model boundary (docs/writing-a-defense.md, "What the defense receives"): building the :class:`DefenseContext`, the only thing a defense sees.

A defender has the suspicious model, a small trusted clean subset and, for defenses that declare
``uses_training_set = True``, read access to the (possibly poisoned) training set.  Never the trigger,
the attack parameters, the poison indices or the attacked test set.  This module is the one place that
turns a dataset file into that view; everything it hands out is a private copy or a read-only lazy view.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from testbed.data import h5data
from testbed.defense import DefenseContext, ReadOnlyArray, TrainingSet
from testbed.core.errors import UserError
from testbed.scoring.scorer import DataRef, opened

DEFAULT_CLEAN_FRACTION = 0.05  # for files without /defense/clean_index (a clean dataset: every sample is clean)

Progress = Callable[[float, str], None]


def _own_copy(a: np.ndarray) -> np.ndarray:
    """A private copy per defense run: a defense may scribble on it without affecting the next one."""
    return np.array(a, copy=True, order="C")


def clean_subset(data_path: DataRef, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The defender's trusted clean subset: ``/train`` rows at ``/defense/clean_index``.

    A file without that index (a clean dataset, e.g. a benign zoo entry's) holds no poison, so a seeded
    5% of ``/train`` stands in for it.  An index that overlaps ``/train/poison_index`` is refused.
    """
    with opened(data_path) as f:
        n = f.length("train")
        if h5data.CLEAN_INDEX in f:
            index = np.asarray(f[h5data.CLEAN_INDEX], dtype=np.int64)
            if index.size == 0 or index.min() < 0 or index.max() >= n:
                raise UserError(f"{f.path}: /defense/clean_index is empty or points outside /train; re-create it with `testbed poison`")
            if h5data.POISON_INDEX in f and np.intersect1d(index, f[h5data.POISON_INDEX]).size:
                raise UserError(f"{f.path}: /defense/clean_index holds poisoned samples; re-create the file with `testbed poison`")
        elif f.is_poisoned or h5data.POISON_INDEX in f:
            raise UserError(f"{f.path} is poisoned but has no /defense/clean_index; re-create it with `testbed poison`")
        else:
            rng = np.random.default_rng(seed)
            index = np.sort(rng.choice(n, size=max(2, int(round(DEFAULT_CLEAN_FRACTION * n))), replace=False))
        return f.read(h5data.TRAIN_IMAGES, index), f.read(h5data.TRAIN_LABELS, index)


def make_context(
    defense: Any,
    data_path: DataRef,
    *,
    device: torch.device,
    seed: int = 0,
    budget_s: float | None = None,
    budget_passes: int | None = None,
    progress: Progress | None = None,
) -> DefenseContext:
    """The :class:`DefenseContext` a defense may see: nothing about the attack, ever."""
    with opened(data_path) as f:
        images, labels = clean_subset(f, seed)
        classes, image_size = tuple(f.classes), f.image_size
        ignore = f.ignore_index
        shapes = {k: (f.shape(k), f.dtype(k)) for k in (h5data.TRAIN_IMAGES, h5data.TRAIN_LABELS)}
        data_path = f.path
    train = None
    if getattr(defense, "uses_training_set", False) is True:
        train = TrainingSet(
            images=ReadOnlyArray(h5data.RowReader(data_path, h5data.TRAIN_IMAGES), *shapes[h5data.TRAIN_IMAGES]),
            labels=ReadOnlyArray(h5data.RowReader(data_path, h5data.TRAIN_LABELS), *shapes[h5data.TRAIN_LABELS]),
        )
    return DefenseContext(
        clean_images=_own_copy(images),
        clean_labels=_own_copy(labels),
        classes=classes,
        device=device,
        seed=int(seed),
        budget_s=budget_s,
        budget_passes=budget_passes,
        train=train,
        image_size=image_size,
        ignore_index=ignore,
        progress=progress if progress is not None else (lambda fraction, message: None),
    )
