"""A training run's directory: its lock, the resume-or-refuse decision, and the epoch checkpoint's I/O.

RUN/ layout: ``model.safetensors``, ``config.json``, ``train_log.jsonl``, ``metrics.json``, ``checkpoint.pt``.
Why apart from the loop: these decide what may be written where before any training starts, and their
refusals (a file as --out, a run started with other settings) are words the user reads, not loop logic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision

from testbed import __version__
from testbed.core import atomic
from testbed.core.errors import UserError
from testbed.core.guards import RunLock
from testbed.training.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("model.safetensors", "config.json", "train_log.jsonl", "metrics.json", CHECKPOINT, "curve.csv", "curve.json",
             "curve.png")
# Fields that may change between a run and its --resume without changing the numbers it computes.
_RESUME_FREE = ("device", "num_workers", "log_every", "val_every")


def versions() -> dict[str, str]:
    return {
        "segbackdoor": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
    }


def _resume_key(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in _RESUME_FREE}


class _KeepError(io.RawIOBase):
    """A file wrapper that remembers the OSError of a failed write — or the Ctrl-C that interrupted one:
    ``torch.save`` turns either into an opaque RuntimeError ("unexpected pos ...") when it closes the archive, so a
    full disk would otherwise not be recognisable and an interrupt would surface as a traceback."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except (OSError, KeyboardInterrupt) as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    with atomic.atomic_file(path) as tmp, open(tmp, "wb") as raw:
        sink = _KeepError(raw)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None  # atomic_file words it as one line ("cannot write ...: No space left")
            raise


@contextlib.contextmanager
def locked_run_dir(out: Path, dist: Any) -> Iterator[None]:
    """RUN/ created when missing and locked (rank 0) for the whole run: a second trainer stops naming the holder.

    A run that fails before its first checkpoint leaves nothing behind when this call created RUN/.
    """
    if not dist.is_main:
        yield
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory path")
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror or e}); choose a writable location") from None
    try:
        with RunLock(out):
            yield
    except BaseException:
        if created and not (out / CHECKPOINT).is_file():
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping: no partial output
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own checkpoint, read without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a checkpoint we can trust
        raise UserError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}); start again with --overwrite"
        ) from None


def plan_run_dir(out: Path, resume: bool, overwrite: bool, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Decide what to do with RUN/ (read-only): returns the checkpoint to resume from, or None for a fresh run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory path")
    stale = {t for name in RUN_FILES for t in out.glob(f".{name}.*.tmp")} if out.is_dir() else set()
    # a killed run's temp files and our own lock don't count
    present = out.is_dir() and any(p not in stale and p.name != RunLock.NAME for p in out.iterdir())
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: {out} holds no {CHECKPOINT} to continue from; run without --resume to start")
        ckpt = load_checkpoint(ckpt_path)
        saved = _upgrade_identity(ckpt.get("identity", {}), identity)
        if _resume_key(saved.get("train", {})) != _resume_key(identity["train"]) or {
            k: v for k, v in saved.items() if k != "train"
        } != {k: v for k, v in identity.items() if k != "train"}:
            diff = _describe_diff(saved, identity)
            raise UserError(
                f"--resume: {out} was started with different settings ({diff}); repeat the original ones or use --overwrite"
            )
        return ckpt
    if present and not overwrite:
        hint = " (it looks like an unfinished run: add --resume)" if ckpt_path.is_file() and not (out / "model.safetensors").exists() else ""
        raise UserError(f"--out {out} already holds files{hint}; use --overwrite to replace it or choose another directory")
    return None


def _upgrade_identity(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written by an earlier version, in today's terms: a setting it did not record yet ran with
    that setting's default.  Before the resolved ``precision`` was recorded, a run's arithmetic followed from
    its device and its ``amp``/``channels_last`` settings alone, which are compared as before (the device may
    change on resume), so a missing record is not a difference."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    train = saved.get("train", {})
    out = {**saved, "train": {**{k: v for k, v in defaults.items() if k not in train}, **train}}
    if "precision" not in out and "precision" in now:
        out["precision"] = now["precision"]
    return out


def _describe_diff(saved: dict[str, Any], now: dict[str, Any]) -> str:
    diffs = []
    st, nt = _resume_key(saved.get("train", {})), _resume_key(now["train"])
    for k in sorted(set(st) | set(nt)):
        if st.get(k) != nt.get(k):
            diffs.append(f"{k}: {st.get(k)!r} then, {nt.get(k)!r} now")
    for k in sorted((set(saved) | set(now)) - {"train"}):
        if saved.get(k) != now.get(k):
            diffs.append(f"{k} differs")
    return "; ".join(diffs[:4]) or "unknown difference"


def clear_run_dir(out: Path, resuming: bool) -> None:
    """Remove temp files of a killed process (SIGKILL, power loss), and a fresh run's old outputs."""
    for name in RUN_FILES:
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
        if not resuming:
            (out / name).unlink(missing_ok=True)


def write_log(out: Path, log: list[dict[str, Any]]) -> None:
    atomic.write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
