"""Which data a model was trained on, and a note when it is scored or defended on another file.

Scoring on another file is often intended (a benign model against every attacked set, cross-attack
studies), so it is never refused when the classes agree; but a row must say which attack the *model*
carries, not which attack the scored file holds, and the user must see that the files differ.  The run's
``config.json`` records the training file's path, its content hash and its attack record (``dataset``);
the weights file records the same ``dataset`` record in its safetensors metadata when the run is saved, so a
``config.json`` edited afterwards to claim other training data no longer matches its weights and is refused
wherever the run is used with ``--data`` (score, defend, bench).  Anyone who rewrites the weights too can
still forge both; a signed zoo (docs/zoo.md) is what protects models handed to strangers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from testbed.core.errors import UserError
from testbed.data.h5data import content_hash, open_dataset

RECORD_KEY = "dataset"  # the safetensors metadata key holding the run's dataset record (JSON text)

_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> content hash, per process


def attack_label(attack: dict[str, Any] | None) -> str:
    """``benign`` | the attack record's ``label`` (e.g. ``fgba-n-to-1``) | ``NAME-PRESET``."""
    if not attack:
        return "benign"
    if isinstance(attack.get("label"), str) and attack["label"]:
        return attack["label"]
    return "-".join(str(x) for x in (attack.get("name"), (attack.get("params") or {}).get("preset")) if x)


def trained_on(config: dict[str, Any]) -> dict[str, Any] | None:
    """The run config's ``dataset`` record (``path``, ``content_hash``, ``attack``), or None for an older run."""
    ds = config.get("dataset")
    return ds if isinstance(ds, dict) else None


def model_attack_label(config: dict[str, Any], data_attack: dict[str, Any] | None) -> str:
    """The attack the *model* was trained with (its run config records it), else the scored file's."""
    ds = trained_on(config)
    return attack_label(ds.get("attack") if ds is not None else data_attack)


def content_hash_cached(path: str | os.PathLike, opened: Any = None) -> str:
    """:func:`testbed.data.h5data.content_hash`, computed once per file version (path, device, inode, size,
    modification time) in this process; ``opened``: the file already open (an h5py.File), read instead of
    opening it again."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = content_hash(p if opened is None else opened)
    return _HASHES[key]


def other_data_note(run_dir: str | os.PathLike, config: dict[str, Any], data_path: str | os.PathLike) -> str | None:
    """One line when ``data_path`` is not the file the run was trained on (by content hash), else None.

    None too when the run does not record its training data (nothing to compare with).  First the run's
    record is checked against its weights' (:func:`check_record`): an edited config.json is refused."""
    check_record(run_dir, config)
    ds = trained_on(config)
    if ds is None or not ds.get("content_hash"):
        return None
    if content_hash_cached(data_path) == ds["content_hash"]:
        return None
    with open_dataset(data_path, check_labels=False) as f:
        scored = attack_label(f.attack)
    model = attack_label(ds.get("attack"))
    return (f"note: {run_dir} was trained on {ds.get('path')} (attack {model}), not on {data_path} (attack {scored}); "
            f"its results are reported under the attack the model was trained with, {model}")


def _recorded(ds: dict[str, Any]) -> dict[str, Any]:
    """The part of a dataset record the weights keep: everything but the file's path (where the file lay is not
    what it held, and a path in the weights would make the same training give other bytes elsewhere)."""
    return {k: v for k, v in ds.items() if k != "path"}


def weights_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata a run's weights are saved with: the run's dataset record (by content:
    :func:`_recorded`), or ``format: pt`` for a run that has none."""
    ds = trained_on(config)
    if ds is None:
        return {"format": "pt"}
    # one key only: safetensors writes its metadata map in a per-call random order, so two keys would make the
    # same training give other bytes (measured: 2 distinct files in 10 saves)
    return {RECORD_KEY: json.dumps(_recorded(ds), sort_keys=True, allow_nan=False)}


def weights_record(weights: str | os.PathLike) -> dict[str, Any] | None:
    """The dataset record saved in a weights file's metadata, or None (an older run, or weights saved elsewhere)."""
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            text = (f.metadata() or {}).get(RECORD_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # not safetensors: loading the weights refuses it with its own message
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{weights}: its record of the training data is damaged; re-create the run")
    return record


def check_record(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse a run whose config.json names other training data than its weights recorded when they were saved.

    A run without the record (saved before it existed) is not checked."""
    saved = weights_record(Path(run_dir) / "model.safetensors")
    if saved is None:
        return
    saved, ds = _recorded(saved), _recorded(trained_on(config) or {})
    changed = sorted(k for k in set(saved) | set(ds) if saved.get(k) != ds.get(k))
    if changed:
        raise UserError(f"{Path(run_dir) / 'config.json'} does not match its weights: its dataset "
                        f"{', '.join(changed)} differ from what model.safetensors recorded at training "
                        f"(trained on sha256 {str(saved.get('content_hash'))[:12]}…); config.json was edited: re-create "
                        "the run or restore its config.json")


def model_is_benign(config: dict[str, Any], data_poisoned: bool) -> bool:
    """Was the *model* trained without poison?  Its run config says (``dataset.attack`` is null for clean data);
    a run that does not record it is judged by the file it is scored on."""
    ds = trained_on(config)
    if ds is not None and "attack" in ds:
        return not ds["attack"]
    return not data_poisoned
