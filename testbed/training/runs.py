"""A trained run on disk: ``model.safetensors`` + ``config.json``, saved and loaded without pickle.

Zoo models may come from strangers, so loading reads only the safetensors format (a JSON header plus raw
tensor bytes) and refuses anything else with one clear error: nothing on disk is ever unpickled here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from testbed import models
from testbed.core import atomic, safeload
from testbed.core.device import resolve_device
from testbed.core.errors import UserError
from testbed.training.provenance import weights_metadata

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: nn.Module, config: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``run_dir`` (each atomically); the weights' metadata
    records the run's training data (:func:`testbed.training.provenance.weights_metadata`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    with atomic.atomic_file(run_dir / WEIGHTS) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=weights_metadata(config))
        except SafetensorError as e:  # its I/O errors (a full disk) arrive as this, not as OSError
            raise UserError(f"cannot write {run_dir / WEIGHTS} ({e}); free disk space and run again") from None
    atomic.write_json(run_dir / CONFIG, config)
    return run_dir


def load_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a run, checked for the keys needed to rebuild its model."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist; train one with `testbed train DATA.h5 --model NAME --out {run_dir}`")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory (expected a folder holding {WEIGHTS} and {CONFIG})")
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG}; it is not a finished run (resume it with `testbed train ... --resume`)")
    config = safeload.load_object(path, "re-create the run")
    _check_config(config, path)
    return config


def _check_config(config: dict[str, Any], path: Path) -> None:
    """The keys a model is rebuilt from, with their types: a damaged config is one clear error, not a crash."""
    fix = "it is damaged or not a testbed run config; re-create the run"
    for key in ("model", "num_classes"):
        if key not in config:
            raise UserError(f"{path} lacks {key!r}; {fix}")
    if not isinstance(config["model"], str):
        raise UserError(f"{path}: model must be a model name (a string), got {config['model']!r}; {fix}")
    k = config["num_classes"]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 255:
        raise UserError(f"{path}: num_classes must be an integer in 1..255, got {k!r}; {fix}")
    classes = config.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: classes must be a list of class names, got {str(classes)[:60]}; {fix}")
    if not isinstance(config.get("aux_loss", False), bool):
        raise UserError(f"{path}: aux_loss must be true or false, got {config['aux_loss']!r}; {fix}")


def _not_safetensors(path: Path, e: Exception) -> UserError:
    head = path.read_bytes()[:2]
    kind = (" (it looks like a pickle; pickled checkpoints are refused because loading them can run code)"
            if head[:1] == b"\x80" or head == b"PK" else "")
    return UserError(f"{path} is not a valid safetensors file{kind}; re-export the weights as safetensors ({e})")


def check_weights(path: str | os.PathLike) -> None:
    """Refuse a weights file that is not safetensors by reading only its header (cheap; nothing is executed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; it is not a finished run")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_safetensors(path, e) from None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; it is not a finished run")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_safetensors(path, e) from None


HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_values(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], config: dict[str, Any],
                  path: Path) -> None:
    """Each tensor of the model's own dtype — float16/bfloat16 only where config.json says the weights were
    saved so (``weights_dtype``) — and every floating value finite (NaN/inf weights score as garbage, silently)."""
    half = HALF.get(config.get("weights_dtype"))
    for k, v in state.items():
        want = expected[k].dtype
        if v.dtype != want and not (half is not None and want.is_floating_point and v.dtype == half):
            saved = f" (config.json says {config.get('weights_dtype')})" if half is not None else ""
            raise UserError(f"{path}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, the model holds "
                            f"{str(want).removeprefix('torch.')}{saved}; the weights were converted or damaged: re-create the run")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path}: tensor {k} holds NaN or infinite values; the weights are damaged (or training "
                            "diverged): re-create the run")


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode on device, config)`` of a finished run."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    state = load_weights(run_dir / WEIGHTS)
    name = config["model"]
    if name not in models.available():
        raise UserError(f"{run_dir}: model {name!r} is not available in this segbackdoor; available: {', '.join(models.available())}")
    model = models.create(name, int(config["num_classes"]), aux_loss=bool(config.get("aux_loss", False)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise UserError(f"{run_dir / WEIGHTS} does not fit model {name!r} with {config['num_classes']} classes: "
                        f"{'; '.join(parts)}; the weights and config.json belong to different models")
    _check_values(state, expected, config, run_dir / WEIGHTS)
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device)).eval(), config
