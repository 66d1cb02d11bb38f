"""A dataset file's split as a PyTorch ``Dataset`` (:class:`SegDataset`), for the trainer's DataLoader.

Why apart from :mod:`testbed.data.h5data`: the file format (write, validate, read, hash) needs no torch; this is the
one view of it that does.  ``testbed.data.h5data.SegDataset`` still names this class.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

from testbed.core.errors import UserError
from testbed.data import h5data


class SegDataset(torch.utils.data.Dataset):
    """Samples of one split as ``(image uint8 [H,W,3], label uint8 [H,W])`` tensors.

    Safe with ``num_workers > 0``: the HDF5 handle is opened lazily in each process.  Small splits
    (``in_memory`` default: under 1 GiB) are read once into memory; otherwise ``__getitems__`` reads a
    batch with one sorted h5py selection.  Conversion to float and normalization happen on the
    device, in the trainer, where it is cheapest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        indices: Iterable[int] | None = None,
        in_memory: bool | None = None,
    ) -> None:
        self.path = str(path)
        self.split = split
        with h5data.open_dataset(path, check_labels=False) as f:
            n = f.length(split) if h5data.path(split, "images") in f else None
            if n is None:
                raise UserError(f"{path} has no split {split!r}")
            nbytes = f.file[h5data.path(split, "images")].nbytes + f.file[h5data.path(split, "labels")].nbytes
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(list(indices), dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise UserError(f"indices out of range for {split} split of size {n}")
        self.in_memory = nbytes < (1 << 30) if in_memory is None else in_memory
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.indices.size)

    def _arrays(self):
        if self._pid != os.getpid():  # a fresh handle per worker process
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            if self.in_memory:  # tensors once; rows are then views, as in TensorDataset
                self._images = torch.from_numpy(self._file[h5data.path(self.split, "images")][()])
                self._labels = torch.from_numpy(self._file[h5data.path(self.split, "labels")][()])
            else:
                self._images = self._file[h5data.path(self.split, "images")]
                self._labels = self._file[h5data.path(self.split, "labels")]
        return self._images, self._labels

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]):
        images, labels = self._arrays()
        idx = self.indices[np.asarray(items, dtype=np.int64)]
        if self.in_memory:
            return [(images[j], labels[j]) for j in idx.tolist()]
        x, y = torch.from_numpy(h5data.read_rows(images, idx)), torch.from_numpy(h5data.read_rows(labels, idx))
        return list(zip(x, y))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_file=None, _pid=None, _images=None, _labels=None)
        return state
