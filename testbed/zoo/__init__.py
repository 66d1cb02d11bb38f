"""Model zoos: a grid of models × attacks × seeds, built once, resumable, verifiable, loadable from Python.

>>> import testbed.zoo
>>> zoo = testbed.zoo.open("zoo/")
>>> for entry in zoo:                      # finished entries, in spec order
...     model = entry.load_model("cpu")    # safetensors only: loading a stranger's zoo runs no code
...     print(entry.id, entry.metrics["ASR"])

Nothing is used on the manifest's word alone: opening checks the manifest (checksum, shape, paths), and an
entry's files — weights, config, log, metrics, the datasets it was trained and scored on — are hashed against
it before the entry is handed out (iteration, ``Zoo.entry``, ``ZooEntry.load_model``), once per process.  A
mismatch is a :class:`~testbed.core.errors.UserError` naming the file.

Build one with ``testbed zoo build SPEC.toml --out zoo/`` (see docs/zoo.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

from testbed.core.errors import UserError, did_you_mean
from testbed.training.runs import load_run
from testbed.zoo import integrity, signing
from testbed.zoo import manifest as _mf

__all__ = ["Zoo", "ZooEntry", "benign_floors", "entry_group", "listed_floors", "open"]


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
    zoo_path: Path | None = field(default=None, repr=False)
    data_files: dict[str, str] = field(default_factory=dict, repr=False)  # its datasets: zoo-relative path → sha256

    def verify(self) -> None:
        """Refuse (``UserError``) unless every file this entry uses matches the manifest's sha256.

        Files are hashed once per process (again only when they change), so calling this often is cheap.
        """
        if self.zoo_path is None:
            return
        for rel, sha in {**self.files, **self.data_files}.items():
            problem = integrity.file_problem(self.zoo_path, rel, sha)
            if problem is not None:
                raise UserError(f"zoo {self.zoo_path}, entry {self.id}: {problem}; refusing to use it: "
                                f"run `testbed zoo verify {self.zoo_path}`, restore the file or rebuild the entry")

    def load_model(self, device: str = "cpu"):
        """The trained model in eval mode (safetensors + JSON: never unpickles), after :meth:`verify`."""
        self.verify()
        return load_run(self.run_dir, device)[0]

    @property
    def group(self) -> dict[str, Any]:
        """The entry's grid point without its seed: ``model``, ``attack`` (the attack id, rate/trigger suffixes
        included) and each [grid] training axis, named in the id (``...--sSEED--AXIS-VALUE``), valued from the
        run's training arguments.  Entries that differ only in seed share it."""
        return entry_group(self.id, self.model, self.attack_id, self.seed, (self.config or {}).get("train") or {})


def entry_group(entry_id: str, model: str, attack_id: str, seed: int, train: dict[str, Any]) -> dict[str, Any]:
    """:attr:`ZooEntry.group` from an entry's id, model, attack id, seed and training arguments (``train``: the
    run's config.json ``train``, or a manifest row's ``config``): ``model``, ``attack`` and each grid training axis
    named in the id (``...--sSEED--AXIS-VALUE``), valued from ``train``."""
    group: dict[str, Any] = {"model": model, "attack": attack_id}
    prefix = f"{model}--{attack_id}--s{seed}"
    axes = entry_id[len(prefix):].split("--")[1:] if entry_id.startswith(prefix) else []
    for part in axes:
        key, _, value = part.partition("-")
        group[key] = train.get(key, value)
    return group


def _without_attack(entry: Any) -> str:
    return repr(sorted((k, str(v)) for k, v in entry.group.items() if k != "attack"))


def benign_floors(entries: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Attacked entry id → ``{"entry": BENIGN_ID, "ASR": A}``: the ASR the zoo's finished benign entry of the same
    architecture, seed and training axes (``entries``: a zoo's) scores on that entry's attacked test set.
    An attacked model must exceed it for its ASR to measure a backdoor (a weak model may label the target class
    there anyway).  Entries without such a benign entry, or without its reference score, are left out.

    The one pairing rule: `testbed bench --zoo` (its ``benign_floor``) and `testbed zoo ls` (through
    :func:`listed_floors`) both use it.  ``entries`` need ``id``, ``attack_id``, ``seed``, ``is_benign``, ``group``
    and ``metrics["reference"]`` (a benign entry's scores per attack id), as :class:`ZooEntry` has."""
    benign = {(_without_attack(e), e.seed): e for e in entries if e.is_benign}
    out = {}
    for e in entries:
        ref = benign.get((_without_attack(e), e.seed)) if not e.is_benign else None
        scores = (ref.metrics.get("reference") or {}).get(e.attack_id) if ref is not None else None
        score = scores.get("ASR") if isinstance(scores, dict) else None  # a hand-edited manifest: no floor, no crash
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            out[e.id] = {"entry": ref.id, "ASR": float(score)}
    return out


def listed_floors(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`benign_floors` over a manifest's entry rows (:func:`testbed.zoo.manifest.collect`, entries still
    building included: only finished benign entries have reference scores)."""
    views = [SimpleNamespace(id=r["id"], attack_id=r["attack_id"], seed=r["seed"], is_benign=r["is_benign"],
                             group=entry_group(r["id"], r["model"], r["attack_id"], r["seed"], r.get("config") or {}),
                             metrics={"reference": r.get("reference") if r.get("status") == "done" else None})
             for r in rows]
    return benign_floors(views)


class Zoo:
    """A built (or partly built) zoo directory; iterating yields its finished entries, each verified."""

    def __init__(self, path: str | os.PathLike, public_key: str | os.PathLike | None = None):
        self.path = Path(path)
        signing.require_signed(self.path, public_key)  # with a key: the manifest below is the publisher's
        self.manifest = _mf.load_manifest(self.path)  # checksum, shape and layout checked: paths stay inside
        self._entries: dict[str, ZooEntry] = {}
        self.pending: list[str] = []
        datasets = self.manifest["datasets"]
        records = self.manifest.get("records") or {}
        problems = [p for rel, h in sorted(records.items()) if (p := integrity.file_problem(self.path, rel, h)) is not None]
        problems = problems or integrity.dataset_record_problems(self.path, datasets)
        if problems:  # plan.json and the dataset sidecars: small files, hashed and cross-checked when opened
            raise UserError(f"zoo {self.path}: {problems[0]}; run `testbed zoo verify {self.path}`")
        for row in self.manifest["entries"]:
            if row["status"] != "done":
                self.pending.append(row["id"])
                continue
            self._entries[row["id"]] = self._entry(row, datasets)

    def _entry(self, row: dict[str, Any], datasets: dict[str, Any]) -> ZooEntry:
        used = [row["dataset"], *row.get("reference_data", {}).values()]
        config_rel = f"{row['run_dir']}/config.json"
        records = [rel for rel in row["files"] if rel.rsplit("/", 1)[-1] in ("config.json", "done.json", "entry.json")]
        problems = [p for rel in records if (p := integrity.file_problem(self.path, rel, row["files"][rel])) is not None]
        problems = problems or integrity.record_problems(self.path, row, datasets)
        if problems:
            raise UserError(f"zoo {self.path}, entry {row['id']}: {problems[0]}; run `testbed zoo verify {self.path}`")
        metrics = dict(row.get("metrics") or {})
        if row["is_benign"]:
            metrics["reference"] = row.get("reference") or {}
        return ZooEntry(
            id=row["id"], model=row["model"], attack_id=row["attack_id"], seed=row["seed"], is_benign=row["is_benign"],
            run_dir=self.path / row["run_dir"], data_path=self.path / row["data"],
            config=_mf.read_json(self.path / config_rel) or {}, metrics=metrics, attack=row.get("attack"),
            reference_data={label: self.path / datasets[name]["file"] for label, name in row.get("reference_data", {}).items()},
            files=dict(row["files"]), zoo_path=self.path,
            data_files={datasets[n]["file"]: datasets[n]["sha256"] for n in used},
        )

    @property
    def complete(self) -> bool:
        return not self.pending

    def entry(self, entry_id: str) -> ZooEntry:
        """A finished entry, verified against the manifest (``UserError`` if a file it uses was changed)."""
        if entry_id in self._entries:
            self._entries[entry_id].verify()
            return self._entries[entry_id]
        if entry_id in self.pending:
            raise UserError(f"zoo entry {entry_id!r} is not finished; finish it with `testbed zoo build`")

        hint = did_you_mean(entry_id, self._entries)
        raise UserError(f"no entry {entry_id!r} in zoo {self.path}{hint}; list them with `testbed zoo ls {self.path}`")

    def __iter__(self) -> Iterator[ZooEntry]:
        for entry in self._entries.values():
            entry.verify()
            yield entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __repr__(self) -> str:
        return f"Zoo({str(self.path)!r}, {len(self)} entries{', ' + str(len(self.pending)) + ' pending' if self.pending else ''})"


def open(path: str | os.PathLike, public_key: str | os.PathLike | None = None) -> Zoo:  # noqa: A001 - documented name
    """Open a zoo directory made by ``testbed zoo build`` (its manifest is checked; entries when handed out).

    ``public_key``: a PEM public key; the zoo is refused unless its manifest is signed by it (docs/zoo.md)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"zoo {path} is not a directory; build one with `testbed zoo build SPEC.toml --out {path}`")
    return Zoo(path, public_key)


