"""Which data a model was trained on, and a note when it is scored or defended on another file.

Scoring on another file is often intended (a benign model against every attacked set, cross-attack
studies), so it is never refused when the classes agree; but a row must say which attack the *model*
carries, not which attack the scored file holds, and the user must see that the files differ.  The run's
``config.json`` records the training file's path, its content hash and its attack record (``dataset``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def content_hash_cached(path: str | os.PathLike) -> str:
    """:func:`testbed.data.h5data.content_hash`, computed once per file version in this process."""
    from testbed.data.h5data import content_hash

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = content_hash(p)
    return _HASHES[key]


def other_data_note(run_dir: str | os.PathLike, config: dict[str, Any], data_path: str | os.PathLike) -> str | None:
    """One line when ``data_path`` is not the file the run was trained on (by content hash), else None.

    None too when the run does not record its training data (nothing to compare with)."""
    from testbed.data.h5data import open_dataset

    ds = trained_on(config)
    if ds is None or not ds.get("content_hash"):
        return None
    if content_hash_cached(data_path) == ds["content_hash"]:
        return None
    with open_dataset(data_path, check_labels=False) as f:
        scored = attack_label(f.attack)
    model = attack_label(ds.get("attack"))
    return (f"note: {run_dir} was trained on {ds.get('path')} (attack {model}), not on {data_path} (attack {scored}); "
            f"its rows are labelled with the model's attack, {model}")


def model_is_benign(config: dict[str, Any], data_poisoned: bool) -> bool:
    """Was the *model* trained without poison?  Its run config says (``dataset.attack`` is null for clean data);
    a run that does not record it is judged by the file it is scored on."""
    ds = trained_on(config)
    if ds is not None and "attack" in ds:
        return not ds["attack"]
    return not data_poisoned
