"""Model zoos: a grid of models × attacks × seeds, built once, resumable, verifiable, loadable from Python.

>>> import testbed.zoo
>>> zoo = testbed.zoo.open("zoo/")
>>> for entry in zoo:                      # finished entries, in spec order
...     model = entry.load_model("cpu")    # safetensors only: loading a stranger's zoo runs no code
...     print(entry.id, entry.metrics["ASR"])

Build one with ``testbed zoo build SPEC.toml --out zoo/`` (see docs/zoo.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from testbed.errors import UserError
from testbed.zoo import manifest as _mf

__all__ = ["Zoo", "ZooEntry", "open"]


@dataclass
class ZooEntry:
    """One finished model of a zoo: the attributes ``testbed bench --zoo`` and the suites rely on."""

    id: str
    model: str
    attack_id: str  # the [[attack]] id (plus "-rRATE"/"-tTRIGGER" when the grid varies those)
    seed: int
    is_benign: bool
    run_dir: Path  # a RUN/ directory: model.safetensors, config.json, train_log.jsonl, metrics.json
    data_path: Path  # the dataset it was trained on (clean.h5 for a benign entry); scored on its test splits
    config: dict[str, Any]  # the run's config.json (model, classes, training arguments, dataset hash)
    metrics: dict[str, Any]  # mIoU-B, PA-B, mIoU-A, PA-A, ASR, PBA, per_class_iou_b (+ "reference" if benign)
    attack: dict[str, Any] | None = None  # poison_file keyword arguments (seed included); None when benign
    reference_data: dict[str, Path] = field(default_factory=dict)  # benign: attack id → attacked dataset
    files: dict[str, str] = field(default_factory=dict)  # zoo-relative path → sha256

    def load_model(self, device: str = "cpu"):
        """The trained model in eval mode (safetensors + JSON: never unpickles)."""
        from testbed.runs import load_run

        return load_run(self.run_dir, device)[0]


class Zoo:
    """A built (or partly built) zoo directory; iterating yields its finished entries."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = _mf.load_manifest(self.path)
        self._entries: dict[str, ZooEntry] = {}
        self.pending: list[str] = []
        for row in self.manifest["entries"]:
            if row.get("status") != "done":
                self.pending.append(row["id"])
                continue
            run_dir = self._inside(row["run_dir"])
            config = _mf.read_json(run_dir / "config.json") or {}
            metrics = dict(row.get("metrics") or {})
            refs = {}
            if row["is_benign"]:
                metrics["reference"] = row.get("reference") or {}
                plan_row = self._plan_rows().get(row["id"], {})
                refs = {label: _mf.dataset_file(self.path, name) for label, name in (plan_row.get("reference") or {}).items()}
            self._entries[row["id"]] = ZooEntry(
                id=row["id"], model=row["model"], attack_id=row["attack_id"], seed=int(row["seed"]),
                is_benign=bool(row["is_benign"]), run_dir=run_dir, data_path=self._inside(row["data"]),
                config=config, metrics=metrics, attack=row.get("attack"), reference_data=refs,
                files=row.get("files") or {},
            )

    def _inside(self, rel: str) -> Path:
        """A manifest path, refused unless it stays inside the zoo (zoos come from strangers)."""
        path = (self.path / rel).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise UserError(f"zoo {self.path}: manifest path {rel!r} points outside the zoo; refusing it")
        return path

    def _plan_rows(self) -> dict[str, Any]:
        if not hasattr(self, "_plan"):
            self._plan = (_mf.read_json(self.path / _mf.PLAN) or {}).get("entries", {})
        return self._plan

    @property
    def complete(self) -> bool:
        return not self.pending

    def entry(self, entry_id: str) -> ZooEntry:
        if entry_id in self._entries:
            return self._entries[entry_id]
        if entry_id in self.pending:
            raise UserError(f"zoo entry {entry_id!r} is not finished; finish it with `testbed zoo build`")
        import difflib

        close = difflib.get_close_matches(entry_id, list(self._entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"no entry {entry_id!r} in zoo {self.path}{hint}; list them with `testbed zoo ls {self.path}`")

    def __iter__(self) -> Iterator[ZooEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __repr__(self) -> str:
        return f"Zoo({str(self.path)!r}, {len(self)} entries{', ' + str(len(self.pending)) + ' pending' if self.pending else ''})"


def open(path: str | os.PathLike) -> Zoo:  # noqa: A001 - the documented name: testbed.zoo.open(path)
    """Open a zoo directory made by ``testbed zoo build`` (its manifest's checksum is checked)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"zoo {path} is not a directory; build one with `testbed zoo build SPEC.toml --out {path}`")
    return Zoo(path)


