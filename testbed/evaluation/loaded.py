"""One trained model and its dataset file, loaded once per model × defense pair and passed on.

A :class:`LoadedRun` holds what every step of a defense run reads: the model (its weights read once), the
run's ``config.json`` (read once), the data file (opened once and kept open for the pair) with its facts,
and the device.  The defense gets its own deep copy of the model (:meth:`LoadedRun.fresh_model`); the
scores of the original model ("before") are computed once per batch size and reused by every defense
run on the same :class:`LoadedRun`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from testbed.core.device import resolve_device
from testbed.core.errors import UserError
from testbed.data.h5data import SegFile, open_dataset
from testbed.scoring.scorer import score_model
from testbed.training.provenance import content_hash_cached
from testbed.training.runs import load_run

# content hashes of data files, per file version (resolved path, device, inode, size, mtime) in this process: a
# file replaced at the same path is a new version, hashed afresh


@dataclass(frozen=True)
class DataFacts:
    """What the runner needs to know about the data file besides its arrays."""

    classes: list[str]
    attack: dict[str, Any] | None
    n_train: int
    is_poisoned: bool


@dataclass
class LoadedRun:
    """A model, its run config, its open data file and the device, for one pair (see the module docstring)."""

    run_dir: Path
    data_path: Path
    model: nn.Module  # eval mode, on ``device``; never handed to a defense (see fresh_model)
    config: dict[str, Any]  # the run's config.json
    data: SegFile  # open, labels checked; closed by load_pair
    facts: DataFacts
    device: torch.device
    _before: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _weights_digest: str | None = field(default=None, repr=False)

    def fresh_model(self) -> nn.Module:
        """A private copy of the model (a defense may change it in place)."""
        return copy.deepcopy(self.model)

    def before(self, batch_size: int) -> dict[str, Any]:
        """The original model's scores on the data file, computed once per batch size."""
        if batch_size not in self._before:
            self._before[batch_size] = score_model(self.model, self.data, device=self.device, batch_size=batch_size)
        return self._before[batch_size]

    def set_before(self, batch_size: int, scores: dict[str, Any]) -> None:
        """Scores of the original model already known to the caller (the bench computes them once per model)."""
        self._before[batch_size] = scores

    def weights_digest(self) -> str:
        """sha256 over the loaded model's state (every tensor's name, dtype, shape and values), from memory: what
        the scores depend on, whatever file it came from (the weights file is not read again)."""
        if self._weights_digest is None:
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                flat = t.detach().cpu().contiguous().reshape(-1)
                h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
            self._weights_digest = h.hexdigest()
        return self._weights_digest

    def data_digest(self) -> str:
        """The data file's content hash (:func:`testbed.data.h5data.content_hash`), read from the open file once
        per file version in this process (the one cache the provenance check uses too)."""
        return content_hash_cached(self.data_path, self.data.file)


@contextmanager
def load_pair(run_dir: str | os.PathLike, data_path: str | os.PathLike,
              device: str | torch.device = "cpu") -> Iterator[LoadedRun]:
    """The :class:`LoadedRun` of ``run_dir`` with ``data_path``, its data file open until the block ends."""
    device = resolve_device(device)
    run_dir, data_path = Path(run_dir), Path(data_path)
    with open_dataset(data_path) as f:
        facts = DataFacts(list(f.classes), f.attack, f.length("train"), bool(f.is_poisoned))
        model, config = load_run(run_dir, device)
        if list(config.get("classes") or facts.classes) != facts.classes:
            raise UserError(f"{run_dir} was trained on other classes than {data_path} has; defend it with the data it "
                            "was trained on")
        yield LoadedRun(run_dir, data_path, model, config, f, facts, device)
