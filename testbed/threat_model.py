"""The threat-model boundary (SPEC §8): building the :class:`DefenseContext`, the only thing a defense sees.

A defender has the suspicious model, a small trusted clean subset and, for defenses that declare
``uses_training_set = True``, read access to the (possibly poisoned) training set.  Never the trigger,
the attack parameters, the poison indices or the attacked test set.  This module is the one place that
turns a dataset file into that view; everything it hands out is a private copy or a read-only lazy view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from testbed.defense import DefenseContext, ReadOnlyArray, TrainingSet
from testbed.errors import UserError

DEFAULT_CLEAN_FRACTION = 0.05  # for files without /defense/clean_index (a clean dataset: every sample is clean)

Progress = Callable[[float, str], None]


class _H5Rows:
    """Reads rows of one array of one file, on demand; the only handle a defense gets on the training set."""

    __slots__ = ("_path", "_name")

    def __init__(self, path: Path, name: str) -> None:
        self._path = str(path)
        self._name = name

    def __call__(self, index: Any) -> np.ndarray:
        import h5py

        with h5py.File(self._path, "r") as f:
            ds = f[self._name]
            if isinstance(index, (int, np.integer, slice)) or index is Ellipsis:
                return ds[index]
            if isinstance(index, tuple):
                return ds[()][index] if len(ds) <= 4096 else ds[index]
            idx = np.asarray(index)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            idx = np.where(idx < 0, idx + len(ds), idx)
            if idx.size == 0:
                return np.empty((0,) + ds.shape[1:], ds.dtype)
            uniq, inverse = np.unique(idx, return_inverse=True)
            return ds[uniq][inverse]


def _own_copy(a: np.ndarray) -> np.ndarray:
    """A private copy per defense run: a defense may scribble on it without affecting the next one."""
    return np.array(a, copy=True, order="C")


def clean_subset(data_path: str | os.PathLike, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The defender's trusted clean subset: ``/train`` rows at ``/defense/clean_index``.

    A file without that index (a clean dataset, e.g. a benign zoo entry's) holds no poison, so a seeded
    5% of ``/train`` stands in for it.  An index that overlaps ``/train/poison_index`` is refused.
    """
    from testbed.h5data import open_dataset

    with open_dataset(data_path, check_labels=False) as f:
        n = f.length("train")
        if "defense/clean_index" in f:
            index = np.asarray(f["defense/clean_index"], dtype=np.int64)
            if index.size == 0 or index.min() < 0 or index.max() >= n:
                raise UserError(f"{f.path}: /defense/clean_index is empty or points outside /train; re-create it with `testbed poison`")
            if "train/poison_index" in f and np.intersect1d(index, f["train/poison_index"]).size:
                raise UserError(f"{f.path}: /defense/clean_index holds poisoned samples; re-create the file with `testbed poison`")
        elif f.is_poisoned or "train/poison_index" in f:
            raise UserError(f"{f.path} is poisoned but has no /defense/clean_index; re-create it with `testbed poison`")
        else:
            rng = np.random.default_rng(seed)
            index = np.sort(rng.choice(n, size=max(2, int(round(DEFAULT_CLEAN_FRACTION * n))), replace=False))
        return f.read("train/images", index), f.read("train/labels", index)


def make_context(
    defense: Any,
    data_path: str | os.PathLike,
    *,
    device: torch.device,
    seed: int = 0,
    budget_s: float | None = None,
    budget_passes: int | None = None,
    progress: Progress | None = None,
) -> DefenseContext:
    """The :class:`DefenseContext` a defense may see: nothing about the attack, ever."""
    from testbed.h5data import open_dataset

    data_path = Path(data_path)
    images, labels = clean_subset(data_path, seed)
    with open_dataset(data_path, check_labels=False) as f:
        classes, image_size = tuple(f.classes), f.image_size
        ignore = f.ignore_index
        shapes = {k: (tuple(f.file[f"train/{k}"].shape), f.file[f"train/{k}"].dtype) for k in ("images", "labels")}
    train = None
    if getattr(defense, "uses_training_set", False) is True:
        train = TrainingSet(
            images=ReadOnlyArray(_H5Rows(data_path, "train/images"), *shapes["images"]),
            labels=ReadOnlyArray(_H5Rows(data_path, "train/labels"), *shapes["labels"]),
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
