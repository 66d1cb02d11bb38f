"""Running one defense on one trained model, under the threat model of SPEC §8, and scoring what it returns.

The runner is the only place that sees both sides: it hands the defense a :class:`DefenseContext` holding
only what a defender may have (a fresh copy of the model, the trusted clean subset, and — for defenses that
declare ``uses_training_set = True`` — a read-only view of the training images and labels), then scores the
result with the attacker's secrets (poison indices, attacked test set) the same way for every defense:

- a repaired ``model``      → ``after`` = its scores;
- ``flagged_train``         → retrain with the run's original training arguments on the remaining samples,
                              ``after`` = the retrained model's scores, plus precision/recall of the flags;
- ``input_scores``+threshold → ``after`` = the original model's scores with rejected inputs counted as
                              defended, plus TPR/FPR/AUROC of the filter over benign vs attacked test inputs;
- ``verdict``               → recorded (scored across a zoo by :mod:`testbed.commands.bench`).

``run_defense`` returns one row (a dict).  Keys starting with ``_`` hold arrays for figures and
``scores.csv``; the writers in :mod:`testbed.report` drop them from JSON/CSV.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import math
import os
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from testbed.defense import DefenseContext, DefenseResult, ReadOnlyArray, TrainingSet
from testbed.errors import UserError

ENTRY_POINT_GROUP = "testbed.defenses"
SCORE_KEYS = ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA")
DEFAULT_CLEAN_FRACTION = 0.05  # for files without /defense/clean_index (a clean dataset: every sample is clean)
PANEL_IMAGES = 3  # attacked test images kept for Figure-1-style panels

Progress = Callable[[float, str], None]


# -- loading defenses ------------------------------------------------------------------------------
def builtin_defenses() -> dict[str, type]:
    """``defenses.BUILTIN``: name → class."""
    from testbed import defenses

    return dict(getattr(defenses, "BUILTIN", {}))


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--defense {spec!r}: write an outside defense as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--defense {spec!r}: cannot import module {module_name!r} ({e}); install the package or add it to PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--defense {spec!r}: module {module_name!r} has no {attr!r}; check the class name")
        obj = getattr(obj, part)
    return obj


def load_defense(spec: Any, **params: Any) -> Any:
    """A defense object from a built-in name, ``package.module:Class``, or an entry point in ``testbed.defenses``.

    ``params`` go to the class's ``__init__`` (keyword arguments).  An object that already is a defense is
    returned as is (``params`` must then be empty).
    """
    if not isinstance(spec, str):
        obj = spec
        source = repr(spec)
    else:
        name = spec.strip()
        builtins = builtin_defenses()
        if name in builtins:
            obj, source = builtins[name], f"built-in {name!r}"
        elif ":" in name:
            obj, source = _import_object(name), name
        else:
            eps = _entry_points()
            if name not in eps:
                known = sorted(builtins) + sorted(set(eps) - set(builtins))
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                others = f"; installed plugins: {', '.join(sorted(set(eps) - set(builtins)))}" if set(eps) - set(builtins) else ""
                raise UserError(
                    f"unknown defense {name!r}{hint}; built-ins: {', '.join(sorted(builtins))}{others}; "
                    "an outside defense is named package.module:Class or registered in the entry-point group testbed.defenses"
                )
            try:
                obj = eps[name].load()
            except Exception as e:  # a broken plugin is the user's to fix
                raise UserError(f"defense plugin {name!r} ({eps[name].value}) failed to load: {type(e).__name__}: {e}") from None
            source = f"plugin {name!r} ({eps[name].value})"
    if isinstance(obj, type):
        try:
            obj = obj(**params)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad parameters {sorted(params)} ({e}); see the defense's documentation") from None
    elif params:
        raise UserError(f"{source} is an object, not a class; parameters {sorted(params)} cannot be passed to it")
    name_attr = getattr(obj, "name", None)
    if not isinstance(name_attr, str) or not name_attr or not callable(getattr(obj, "run", None)):
        raise UserError(
            f"{source} is not a defense: it needs a string attribute `name` and a method `run(model, ctx) -> DefenseResult` "
            "(see docs/writing-a-defense.md)"
        )
    return obj


def parse_params(items: list[str] | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """``["strip.n_overlays=16", ...]`` → ``{"strip": {"n_overlays": 16}}``; values are JSON when they parse."""
    import json

    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items or []:
        key, eq, value = item.partition("=")
        defense, dot, param = key.rpartition(".")
        if not eq or not dot or not defense or not param:
            raise UserError(f"--param {item!r}: write it as DEFENSE.KEY=VALUE, e.g. strip.n_overlays=16")
        if defense not in out:
            raise UserError(f"--param {item!r}: {defense!r} is not one of the --defense names ({', '.join(names)})")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        out[defense][param] = parsed
    return out


# -- the threat-model boundary ---------------------------------------------------------------------
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
        train=train,
        image_size=image_size,
        ignore_index=ignore,
        progress=progress if progress is not None else (lambda fraction, message: None),
    )


# -- scoring helpers -------------------------------------------------------------------------------
def _scores_only(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: scores.get(k) for k in SCORE_KEYS}


def _test_sets(data_path: Path) -> dict[str, Any]:
    """Index arrays of the benign and attacked test sets (what ``scores.csv`` refers to)."""
    from testbed.h5data import open_dataset

    with open_dataset(data_path, check_labels=False) as f:
        benign = np.asarray(f["test_benign/index"], dtype=np.int64) if "test_benign/index" in f else np.arange(f.length("test"))
        attacked = "test_attacked/images" in f
        n_att = int(f.file["test_attacked/images"].shape[0]) if attacked else 0
    return {"benign": benign, "attacked": attacked, "n_attacked": n_att}


def _mixed_scores(input_scores: Callable, data_path: Path, sets: dict[str, Any], batch_size: int, seed: int,
                  cache: dict[bytes, float]) -> tuple[np.ndarray, np.ndarray]:
    """The filter's score of every benign and attacked test image, as (benign, attacked) arrays.

    Images are shown in one seeded random order with both kinds mixed in every batch, so a stateful filter
    cannot learn which inputs are attacked from when it sees them.  ``cache`` maps image bytes → score.
    """
    from testbed.h5data import open_dataset

    benign = sets["benign"]
    nb, n = len(benign), len(benign) + sets["n_attacked"]
    order = np.random.default_rng([seed, 0x5C0E]).permutation(n)
    out = np.empty(n, dtype=np.float64)
    with open_dataset(data_path, check_labels=False) as f:
        h, w = f.image_size
        for s in range(0, n, batch_size):
            batch = order[s : s + batch_size]
            is_b = batch < nb
            x = np.empty((batch.size, h, w, 3), dtype=np.uint8)
            if is_b.any():
                x[is_b] = f.read("test/images", benign[batch[is_b]])
            if not is_b.all():
                x[~is_b] = f.read("test_attacked/images", batch[~is_b] - nb)
            v = input_scores(x)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            if v.shape[0] != batch.size:
                raise ValueError(f"input_scores returned {v.shape[0]} scores for {batch.size} images")
            out[batch] = v
            cache.update((_image_key(im), float(val)) for im, val in zip(x, v))
    return out[:nb], out[nb:]


def _image_key(img: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).digest()


def _auroc(benign: np.ndarray, attacked: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if benign.size == 0 or attacked.size == 0:
        return None
    y = np.r_[np.zeros(benign.size), np.ones(attacked.size)]
    s = np.r_[benign, attacked]
    if not np.all(np.isfinite(s)):
        s = np.nan_to_num(s, nan=-np.inf)
        s = np.clip(s, -1e300, 1e300)
    return float(roc_auc_score(y, s))


def _panel_data(data_path: Path, n: int) -> dict[str, np.ndarray] | None:
    from testbed.h5data import open_dataset

    with open_dataset(data_path, check_labels=False) as f:
        if "test_attacked/images" not in f:
            return None
        m = min(n, f.length("test_attacked"))
        return {
            "index": np.arange(m),
            "images": np.asarray(f.file["test_attacked/images"][:m]),
            "gt": np.asarray(f.file["test_attacked/gt"][:m]),
            "target": np.asarray(f.file["test_attacked/labels"][:m]),
        }


def jsonable(x: Any) -> Any:
    """Details → plain JSON (numpy → lists, NaN/inf → None, tuples → lists, unknown → str)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _retrain(run_config: dict[str, Any], data_path: Path, keep: np.ndarray, device: torch.device, work_dir: Path,
             progress: bool) -> nn.Module:
    """Retrain from scratch with the run's original training arguments on the ``keep`` rows of ``/train``."""
    from testbed.runs import load_run
    from testbed.train import TrainConfig, train

    if "train" not in run_config:
        raise UserError("the run's config.json has no 'train' arguments; cannot retrain without the flagged samples")
    cfg = TrainConfig.from_dict(dict(run_config["train"]))
    cfg.device = str(device)
    if device.type != "cuda":
        cfg.amp, cfg.channels_last = False, False
    out = train(data_path, work_dir / "retrained", cfg, train_indices=keep, progress=progress, overwrite=True, score=False)
    model, _ = load_run(out, device)
    return model


MAX_CURVE_POINTS = 25


def _score_pruning_curve(run_dir: Path, data_path: Path, details: dict[str, Any], device: torch.device,
                         batch_size: int) -> None:
    """Add test-set ``miou_b``/``asr`` to a pruning defense's ``details["curve"]`` (the defense cannot: it never
    sees the attacked test set).  Needs ``details["prune_order"]`` (classifier input channels, first pruned
    first) and ``"pruned"`` counts in the curve points; each point is the original model with the first
    ``pruned`` channels of ``model.classifier``'s input zeroed."""
    from testbed.runs import load_run
    from testbed.scoring import score_model

    curve, order = details.get("curve"), details.get("prune_order")
    if not isinstance(curve, list) or not isinstance(order, list) or not curve:
        return
    points = [i for i, p in enumerate(curve) if isinstance(p, dict) and isinstance(p.get("pruned"), int)]
    if len(points) > MAX_CURVE_POINTS:
        pick = np.unique(np.round(np.linspace(0, len(points) - 1, MAX_CURVE_POINTS)).astype(int))
        points = [points[i] for i in pick]
    model, _ = load_run(run_dir, device)
    weight = model.classifier.weight
    original = weight.detach().clone()
    for i in points:
        idx = torch.as_tensor([int(c) for c in order[: curve[i]["pruned"]]], dtype=torch.long, device=weight.device)
        with torch.no_grad():
            weight.copy_(original)
            weight[:, idx] = 0
        s = score_model(model, data_path, device=device, batch_size=batch_size)
        curve[i]["miou_b"], curve[i]["asr"] = s["mIoU-B"], s["ASR"]
    details["curve_test_scores"] = "miou_b and asr: percent on the test sets, scored by the runner"


def run_defense(
    defense: Any,
    run_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    budget_s: float | None = None,
    progress: Progress | None = None,
    batch_size: int = 32,
    before: dict[str, Any] | None = None,
    model_id: str | None = None,
    attack: str | None = None,
    work_dir: str | os.PathLike | None = None,
    panels: int = PANEL_IMAGES,
    train_progress: bool = False,
) -> dict[str, Any]:
    """Run ``defense`` on the model in ``run_dir`` with ``data_path``'s clean subset; score it; return one row.

    ``before``: scores of the original model on ``data_path`` when already known (bench reuses them across
    defenses).  A defense that raises gives a row with ``error`` set (the caller decides the exit code).
    """
    from testbed.device import resolve_device
    from testbed.h5data import open_dataset
    from testbed.runs import load_run
    from testbed.scoring import predict, score_model

    device = resolve_device(device)
    run_dir, data_path = Path(run_dir), Path(data_path)
    with open_dataset(data_path, check_labels=False) as f:
        data_classes = list(f.classes)
        attack_attr = f.attack
        n_train = f.length("train")
    original, config = load_run(run_dir, device)
    if list(config.get("classes") or data_classes) != data_classes:
        raise UserError(f"{run_dir} was trained on other classes than {data_path} has; defend it with the data it was trained on")
    if attack is None:
        attack = "benign" if not attack_attr else "-".join(
            str(x) for x in (attack_attr.get("name"), (attack_attr.get("params") or {}).get("preset")) if x)
    name = str(getattr(defense, "name", type(defense).__name__))
    row: dict[str, Any] = {
        "model": model_id or run_dir.name,
        "attack": attack,
        "defense": name,
        "run": str(run_dir),
        "data": str(data_path),
        "kinds": [],
        "before": None,
        "after": None,
        "DER": None,
        "detection": None,
        "flagged": None,
        "verdict": None,
        "cost": {"seconds": None, "forward_passes": None, "backward_passes": None, "budget_s": budget_s, "over_budget": None},
        "details": {},
        "error": None,
    }
    if before is None:
        before = score_model(original, data_path, device=device, batch_size=batch_size)
    row["before"] = _scores_only(before)
    panel = _panel_data(data_path, panels) if panels > 0 else None
    if panel is not None:
        panel["before"] = predict(original, panel["images"], device, batch_size)
        row["_panel"] = panel

    tmp = Path(tempfile.mkdtemp(prefix="defense-", dir=work_dir))
    try:
        # 1. the defense, on a fresh copy, behind the threat-model boundary
        model, _ = load_run(run_dir, device)
        ctx = make_context(defense, data_path, device=device, seed=seed, budget_s=budget_s, progress=progress)
        _seed_everything(seed)
        t0 = time.perf_counter()
        try:
            result = defense.run(model, ctx)
        finally:
            seconds = time.perf_counter() - t0
            row["cost"]["seconds"] = round(seconds, 4)
            row["cost"]["over_budget"] = None if budget_s is None else bool(seconds > budget_s)
        if not isinstance(result, DefenseResult):
            raise TypeError(f"{name}.run returned {type(result).__name__}, expected testbed.defense.DefenseResult")
        row["kinds"] = result.kinds()
        c = result.cost
        row["cost"].update(jsonable({"forward_passes": getattr(c, "forward_passes", None),
                                      "backward_passes": getattr(c, "backward_passes", None),
                                      "reported_seconds": getattr(c, "seconds", None)}))
        row["details"] = jsonable(result.details or {})
        try:
            _score_pruning_curve(run_dir, data_path, row["details"], device, batch_size)
        except (IndexError, ValueError, TypeError, RuntimeError) as e:  # bad prune_order: keep the defense's result
            row["details"]["curve_test_scores"] = f"not scored: {type(e).__name__}: {e}"

        # 2. scoring, with the attacker's secrets
        after_model: nn.Module | None = None
        if result.model is not None:
            if not isinstance(result.model, nn.Module):
                raise TypeError(f"{name} returned a model of type {type(result.model).__name__}, expected torch.nn.Module")
            after_model = result.model.to(device).eval()
        if result.flagged_train is not None:
            flagged = np.asarray(result.flagged_train).reshape(-1)
            if flagged.size and (not np.issubdtype(flagged.dtype, np.integer) or flagged.min() < 0 or flagged.max() >= n_train):
                raise ValueError(f"flagged_train must hold integer indices in [0, {n_train})")
            flagged = np.unique(flagged.astype(np.int64))
            with open_dataset(data_path, check_labels=False) as f:
                poison = np.asarray(f["train/poison_index"], dtype=np.int64) if "train/poison_index" in f else np.empty(0, np.int64)
            tp = int(np.intersect1d(flagged, poison).size)
            row["flagged"] = {
                "count": int(flagged.size),
                "true_poison": int(poison.size),
                "true_positives": tp,
                "precision": tp / flagged.size if flagged.size else None,
                "recall": tp / poison.size if poison.size else None,
            }
            row["_flagged_index"] = flagged
            if after_model is None:
                keep = np.setdiff1d(np.arange(n_train), flagged)
                t1 = time.perf_counter()
                after_model = _retrain(config, data_path, keep, device, tmp, train_progress)
                row["cost"]["retrain_seconds"] = round(time.perf_counter() - t1, 4)
        input_filter = None
        if result.input_scores is not None:
            if result.threshold is None or not math.isfinite(float(result.threshold)):
                raise ValueError(f"{name} returned input_scores without a finite threshold")
            threshold = float(result.threshold)
            sets = _test_sets(data_path)
            cache: dict[bytes, float] = {}
            s_b, s_a = _mixed_scores(result.input_scores, data_path, sets, batch_size, seed, cache)
            fn = result.input_scores

            def input_filter(images: np.ndarray) -> np.ndarray:
                keys = [_image_key(im) for im in images]
                missing = [i for i, k in enumerate(keys) if k not in cache]
                if missing:
                    v = np.asarray(fn(images[missing]), dtype=np.float64).reshape(-1)
                    cache.update((keys[i], x) for i, x in zip(missing, v))
                return np.array([cache[k] > threshold for k in keys], dtype=bool)

            fb, fa = s_b > threshold, s_a > threshold
            row["detection"] = {
                "tpr": float(fa.mean()) if fa.size else None,
                "fpr": float(fb.mean()) if fb.size else None,
                "auroc": _auroc(s_b, s_a),
                "threshold": threshold,
                "benign_flagged": int(fb.sum()),
                "benign_total": int(fb.size),
                "attacked_flagged": int(fa.sum()),
                "attacked_total": int(fa.size),
            }
            row["_scores"] = {"test_benign": (sets["benign"], s_b), "test_attacked": (np.arange(s_a.size), s_a),
                              "threshold": threshold}
        if result.verdict is not None:
            v = result.verdict
            score = float(np.clip(v.score, -1e300, 1e300))  # ±inf stays extreme in rankings; NaN becomes null
            row["verdict"] = {"backdoored": bool(v.backdoored), "score": jsonable(score),
                              "suspected": [list(map(str, p)) for p in (v.suspected or [])]}

        if after_model is not None or input_filter is not None:
            scored = after_model if after_model is not None else original
            after = score_model(scored, data_path, device=device, batch_size=batch_size, input_filter=input_filter)
            row["after"] = _scores_only(after)
            if "rejected" in after:
                row["details"].setdefault("rejected", jsonable({k: after["rejected"].get(k) for k in
                                                                ("benign", "benign_total", "attacked", "attacked_total")}))
            if before.get("ASR") is not None and after.get("ASR") is not None and before.get("mIoU-B") is not None \
                    and after.get("mIoU-B") is not None:
                from testbed.metrics import der_seg

                row["DER"] = der_seg(before, after)
            if panel is not None:
                pa = predict(scored, panel["images"], device, batch_size)
                rejected = input_filter(panel["images"]) if input_filter is not None else np.zeros(len(pa), bool)
                panel["after"], panel["rejected"] = pa, rejected
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 — a failing defense is a result, not a crash of the bench
        row["error"] = f"{type(e).__name__}: {e}"
        row["details"] = {**(row["details"] or {}), "traceback": traceback.format_exc(limit=8)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of a row (arrays for figures and scores.csv dropped)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}

