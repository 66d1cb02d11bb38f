"""What `testbed data info` reports about a dataset file, as a dict (the command prints or dumps it)."""

from __future__ import annotations

import os
from typing import Any

from testbed.data import h5data
from testbed.data.stats import split_stats, trigger_fidelity

SPLIT_ORDER = ("train", "val", "test", "test_attacked")


def _arrays(f: h5data.SegFile) -> dict[str, dict]:
    return {name: {"shape": list(obj.shape), "dtype": obj.dtype.name, "chunks": list(obj.chunks) if obj.chunks else None,
                   "compression": obj.compression} for name, obj in f.arrays().items()}


def _splits(arrays: dict[str, dict]) -> dict[str, int]:
    names = [n.rsplit("/", 1)[0] for n in arrays if n.endswith("/images")]
    names.sort(key=lambda s: (s not in SPLIT_ORDER, SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 0, s))
    return {s: arrays[h5data.path(s, "images")]["shape"][0] for s in names}


def _poison(f: h5data.SegFile, splits: dict[str, int]) -> dict[str, Any] | None:
    if not (f.is_poisoned and h5data.POISON_INDEX in f):
        return None
    n_poison, n_train = f.shape(h5data.POISON_INDEX)[0], f.length("train")
    attack = f.attack or {}
    return {
        "poisoned_samples": n_poison,
        "train_samples": n_train,
        "achieved_rate": n_poison / max(1, n_train),
        "requested_rate": attack.get("requested_rate", attack.get("rate")),
        "clean_subset": f.shape(h5data.CLEAN_INDEX)[0] if h5data.CLEAN_INDEX in f else None,
        "test_attacked": splits.get("test_attacked"),
        "test_benign": f.shape(h5data.TEST_BENIGN_INDEX)[0] if h5data.TEST_BENIGN_INDEX in f else None,
        "trigger_fidelity": trigger_fidelity(f),
    }


def dataset_info(path: str | os.PathLike, stats: bool = True, show_progress: bool = True) -> dict:
    """Everything `testbed data info --json` prints, as a dict."""
    with h5data.open_dataset(path) as f:
        arrays = _arrays(f)
        splits = _splits(arrays)
        info: dict = {
            "path": str(path),
            "format": f.attrs["format"],
            "schema_version": int(f.attrs["schema_version"]),
            "content_sha256": f.content_hash(),
            "classes": f.classes,
            "num_classes": f.num_classes,
            "ignore_index": f.ignore_index,
            "image_size": list(f.image_size),
            "source": f.source,
            "palette": f.palette,
            "splits": splits,
            "arrays": arrays,
            "attack": f.attack,
            "parent_sha256": f.attrs.get("parent_sha256"),
            "poison": _poison(f, splits),
            "stats": None,
        }
        if stats:
            info["stats"] = {s: split_stats(f, h5data.path(s, "labels"), show_progress).to_dict(f.classes)
                             for s in ("train", "val", "test") if h5data.path(s, "labels") in f}
    return info
