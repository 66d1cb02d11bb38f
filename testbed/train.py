"""Training a segmentation model on the ``/train`` split of a dataset file (SPEC §7).

One plain loop, in the spirit of torchvision's references/segmentation: SGD or AdamW, a poly or one-cycle
schedule stepped per iteration, AMP + channels_last on CUDA, DDP under ``torchrun``.  Reproducibility is
built in rather than bolted on: every random stream (model init, shuffle, flip, dropout) is re-seeded from
``(seed, epoch, rank)`` at the start of each epoch, so a run resumed from an epoch checkpoint needs no RNG
state and ends with the same bytes on CPU as an uninterrupted one.

RUN/ layout: ``model.safetensors``, ``config.json``, ``train_log.jsonl``, ``metrics.json``, ``checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed import atomic, h5data
from testbed import progress as progress_mod
from testbed.device import resolve_device
from testbed.errors import UserError
from testbed.guards import RunLock, check_outputs

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "onecycle")
CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("model.safetensors", "config.json", "train_log.jsonl", "metrics.json", CHECKPOINT)
DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.02}
# Fields that may change between a run and its --resume without changing the numbers it computes.
_RESUME_FREE = ("device", "num_workers", "log_every")


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in ``config.json`` so a run can be repeated exactly.

    ``lr=None`` takes the optimizer's default (AdamW 2e-3, SGD 0.02), meant for the tiny models on 64×64
    synthetic scenes.  ``amp``/``channels_last`` ``"auto"`` means on for CUDA, off on CPU; ``amp`` may
    also name the dtype, ``"bf16"`` or ``"fp16"`` (the latter with a GradScaler).
    ``batch_size`` is per process (as in torchvision's references) under ``torchrun``.
    """

    model: str = "deeplabv3_tiny"
    epochs: int = 10
    batch_size: int = 16
    lr: float | None = None
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    warmup: float = 0.1  # fraction of all steps spent warming up the learning rate
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    amp: bool | str = "auto"
    channels_last: bool | str = "auto"
    aux_loss: bool = False
    aux_weight: float = 0.5
    num_workers: int = 0
    hflip: bool = True
    log_every: int = 20
    backbone_weights: str | None = None

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).lower()
        self.schedule = str(self.schedule).lower()
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of: {', '.join(SCHEDULES)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        checks = [
            (_is_int(self.epochs) and self.epochs >= 1, f"--epochs must be an integer >= 1, got {self.epochs!r}"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"--batch-size must be an integer >= 1, got {self.batch_size!r}"),
            (_finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}"),
            (_finite(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum!r}"),
            (_finite(self.warmup) and 0 <= self.warmup < 1, f"--warmup must be a fraction in [0, 1), got {self.warmup!r}"),
            (_finite(self.aux_weight) and self.aux_weight >= 0, f"--aux-weight must be >= 0, got {self.aux_weight!r}"),
            (_is_int(self.num_workers) and self.num_workers >= 0, f"--workers must be >= 0, got {self.num_workers!r}"),
            (_is_int(self.log_every) and self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every!r}"),
            (_is_int(self.seed) and self.seed >= 0, f"--seed must be a non-negative integer, got {self.seed!r}"),
        ]
        checks += [  # booleans are booleans: hflip = "no" in a zoo spec must not mean "flip"
            (isinstance(self.hflip, bool), f"hflip must be true or false (--no-hflip), got {self.hflip!r}"),
            (isinstance(self.aux_loss, bool), f"aux_loss must be true or false (--aux-loss), got {self.aux_loss!r}"),
            (isinstance(self.amp, (bool, str)), f"amp must be true, false, \"auto\", \"bf16\" or \"fp16\", got {self.amp!r}"),
            (isinstance(self.channels_last, (bool, str)),
             f"channels_last must be true, false or \"auto\", got {self.channels_last!r}"),
            (self.backbone_weights is None or isinstance(self.backbone_weights, str),
             f"backbone_weights must be \"imagenet\" or a file path, got {self.backbone_weights!r}"),
            (isinstance(self.model, str), f"model must be a model name, got {self.model!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        for name in ("amp", "channels_last"):
            value = getattr(self, name)
            if isinstance(value, str):
                words = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
                if name == "amp":
                    words.update(bf16="bf16", fp16="fp16")
                value = words.get(value.lower())
                if value is None:
                    raise UserError(f"{name} must be one of {', '.join(words)}, got {getattr(self, name)!r}")
                setattr(self, name, value)
        from testbed import models  # late: models/ is heavy and optional for config handling

        if self.model not in models.available():
            import difflib

            close = difflib.get_close_matches(self.model, models.available(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown model {self.model!r}{hint}; available: {', '.join(models.available())}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from ``config.json["train"]``; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


def _mix(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts``: independent streams for (seed, epoch, rank, purpose)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


# -- distributed -------------------------------------------------------------------------------
@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True if ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    return _Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def _init_dist(dist: _Dist, device_spec: str) -> torch.device:
    """Pick this process's device and start the process group (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_spec)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=backend, init_method="env://")
    return device


# -- data --------------------------------------------------------------------------------------
class _ShuffleSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch from a generator seeded by ``(seed, epoch)``: resumable without state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, "shuffle"))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool,
               flip_gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC → float NCHW in [0,1] on the device; labels int64 (255 stays the ignore index).

    With ``flip_gen``, a seeded half of the batch is flipped left-right first, on the uint8 data where it
    moves the fewest bytes.
    """
    x = images.to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True)
    if flip_gen is not None:
        flip = (torch.rand(x.shape[0], generator=flip_gen) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        y = torch.where(flip[:, None, None], y.flip(2), y)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # NHWC storage = channels_last strides
    if not channels_last:
        x = x.contiguous()
    return x, y.long()


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy over non-ignored pixels; a batch with none of them gives 0, not NaN."""
    total = F.cross_entropy(logits.float(), target, ignore_index=h5data.IGNORE_INDEX, reduction="sum")
    return total / (target != h5data.IGNORE_INDEX).sum().clamp_min(1)


# -- optimisation ------------------------------------------------------------------------------
def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW, with torch's fused kernel where the parameters' device has one.

    Why fused: torch's default on CPU updates parameter by parameter in Python (≈2.3 ms per step for a tiny
    model's 52 tensors, 4–8% of a batch-8 step on one thread); the fused kernel takes ≈0.4 ms.  Same update rule;
    the last bits of the weights differ from the unfused loop's.
    """
    params = list(params)
    fused = {"fused": True} if params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base lr at ``step`` of ``total``.

    poly: linear warm-up from 0.1, then (1 − t)^0.9 (DeepLab); onecycle: warm-up from 1/25, then cosine
    annealing to 1e-4 (Smith's one-cycle policy, without its momentum cycling).
    """
    warm = int(round(warmup * total))
    if step < warm:
        start = 0.1 if schedule == "poly" else 1 / 25
        return start + (1 - start) * step / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    if schedule == "poly":
        return (1 - t) ** 0.9
    final = 1e-4
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup)
    )


# -- run directory -----------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import torchvision

    from testbed import __version__

    return {
        "segbackdoor": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
    }


def _resume_key(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in _RESUME_FREE}


class _KeepError(io.RawIOBase):
    """A file wrapper that remembers the OSError of a failed write: ``torch.save`` turns it into an opaque
    RuntimeError ("unexpected pos ..."), so a full disk would otherwise not be recognisable."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    with atomic.atomic_file(path) as tmp, open(tmp, "wb") as raw:
        sink = _KeepError(raw)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None  # atomic_file words it as one line ("cannot write ...: No space left")
            raise


@contextlib.contextmanager
def _locked_run_dir(out: Path, dist: _Dist) -> Iterator[None]:
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


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own checkpoint, read without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a checkpoint we can trust
        raise UserError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}); start again with --overwrite"
        ) from None


def _plan_run_dir(out: Path, resume: bool, overwrite: bool, identity: dict[str, Any]) -> dict[str, Any] | None:
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
        ckpt = _load_checkpoint(ckpt_path)
        saved = ckpt.get("identity", {})
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_log(out: Path, log: list[dict[str, Any]]) -> None:
    atomic.write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))


def _score(model: nn.Module, data_path: Path, device: torch.device, batch_size: int) -> dict[str, Any] | None:
    try:
        from testbed.scoring import score_model
    except ImportError:
        print("testbed: warning: testbed.scoring is not available; metrics.json not written", file=sys.stderr)
        return None
    return score_model(model, data_path, device=device, batch_size=batch_size)


# -- the loop ----------------------------------------------------------------------------------
def train(
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    train_indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    overwrite: bool = False,
    score: bool = True,
) -> Path:
    """Train ``cfg.model`` on ``data_path``'s ``/train`` (or the rows ``train_indices``) into ``out_dir``.

    Returns the RUN directory.  Under ``torchrun`` (``WORLD_SIZE>1``) every process calls this; rank 0
    alone writes files.
    """
    from testbed import models

    data_path, out = Path(data_path), Path(out_dir)
    dist = _dist_from_env()
    device = _init_dist(dist, cfg.device)
    try:
        return _train(models, data_path, out, cfg, dist, device, resume, train_indices, progress, overwrite, score)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(models, data_path, out, cfg, dist, device, resume, train_indices, progress, overwrite, score) -> Path:
    use_cuda = device.type == "cuda"
    amp = use_cuda if cfg.amp == "auto" else bool(cfg.amp)
    if amp and not use_cuda:
        raise UserError("--amp needs a CUDA device; use --no-amp on CPU")
    channels_last = use_cuda if cfg.channels_last == "auto" else bool(cfg.channels_last)
    if cfg.amp in ("bf16", "fp16"):
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    else:  # bf16 needs no loss scaling; fp16 (older GPUs) gets a GradScaler
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    with h5data.open_dataset(data_path) as f:
        classes, num_classes, n_total = f.classes, f.num_classes, f.length("train")
        image_size = f.image_size
        data_hash, attack = f.content_hash(), f.attack
    indices = None
    if train_indices is not None:
        indices = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= n_total):
            raise UserError(f"train_indices out of range for the {n_total} training samples of {data_path}")
    dataset = h5data.SegDataset(data_path, "train", indices=indices)
    n = len(dataset)
    per_rank = math.ceil(n / dist.world_size)
    if per_rank < 2:
        raise UserError(f"{data_path}: only {n} training sample(s) for {dist.world_size} process(es); training needs at least 2 per process")
    batch = min(cfg.batch_size, per_rank)  # BatchNorm needs > 1 sample; never drop every batch

    identity = {
        "train": cfg.to_dict(),
        "dataset_hash": data_hash,
        "train_indices": None if indices is None else {"count": int(indices.size), "sha256": indices_digest(indices)},
        "world_size": dist.world_size,
    }
    check_outputs({"--out": out}, {"the training data": data_path})
    with _locked_run_dir(out, dist):
        ckpt = _plan_run_dir(out, resume, overwrite, identity)
        dist.barrier()  # every rank has read RUN/ before rank 0 changes it
        if dist.is_main:
            for name in RUN_FILES:
                for stale in out.glob(f".{name}.*.tmp"):  # temp files of a killed process (SIGKILL, power loss)
                    stale.unlink(missing_ok=True)
                if ckpt is None:
                    (out / name).unlink(missing_ok=True)
        dist.barrier()

        ckpt_path = out / CHECKPOINT
        try:
            # model, seeded
            torch.manual_seed(cfg.seed)
            try:
                model = models.create(cfg.model, num_classes, aux_loss=cfg.aux_loss, backbone_weights=cfg.backbone_weights)
                models.check_input_size(model, image_size)  # e.g. smp encoders need sides divisible by 32
            except ValueError as e:  # unknown model, unusable backbone weights, an image size the model cannot take
                raise UserError(str(e)) from None
            model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            net: nn.Module = model
            if dist.enabled:
                net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

            if dist.enabled:
                sampler = torch.utils.data.DistributedSampler(
                    dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed % 2**31, drop_last=False
                )
            else:
                sampler = _ShuffleSampler(n, cfg.seed)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
                collate_fn=_collate, pin_memory=use_cuda, persistent_workers=cfg.num_workers > 0,
            )
            steps_per_epoch = len(loader)
            opt = make_optimizer(model.parameters(), cfg)
            sched = make_scheduler(opt, cfg, steps_per_epoch * cfg.epochs)
            scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

            start_epoch, log, elapsed = 0, [], 0.0
            if ckpt is not None:
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
                if ckpt.get("scaler"):
                    scaler.load_state_dict(ckpt["scaler"])
                start_epoch, log, elapsed = int(ckpt["epoch"]), list(ckpt["log"]), float(ckpt["elapsed"])

            show = progress and dist.is_main
            for epoch in range(start_epoch, cfg.epochs):
                record = _run_epoch(net, loader, sampler, opt, sched, scaler, cfg, dist, device, epoch,
                                    amp, amp_dtype, channels_last, show, ckpt_path)
                elapsed += record["seconds"]
                log.append(record)
                if dist.is_main:
                    state = {
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "epoch": epoch + 1,
                        "log": log, "elapsed": elapsed, "identity": identity,
                    }
                    _save_checkpoint(state, ckpt_path)
                    _write_log(out, log)
                    if show:
                        _say(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, "
                             f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f}s")
                dist.barrier()
            if dist.is_main:
                model.eval()
                config = {
                    "format": "segbackdoor-run",
                    "model": cfg.model,
                    "num_classes": num_classes,
                    "classes": classes,
                    "aux_loss": cfg.aux_loss,
                    "train": cfg.to_dict(),
                    "train_indices": identity["train_indices"],
                    "dataset": {"path": str(data_path.resolve()), "content_hash": data_hash, "attack": attack,
                                "num_train": n_total, "num_used": n},
                    "versions": _versions(),
                    "device": str(device),
                    "threads": torch.get_num_threads(),  # CPU results depend on it (same threads ⇒ same bytes)
                    "world_size": dist.world_size,
                    "amp": (str(amp_dtype).removeprefix("torch.") if amp else False),
                    "channels_last": channels_last,
                    "batch_size_used": batch,
                    "training_seconds": round(elapsed, 3),
                    "final_loss": log[-1]["loss"] if log else None,
                }
                from testbed.runs import save_model

                save_model(model, config, out)
                if score:
                    metrics = _score(model, data_path, device, max(32, cfg.batch_size))
                    if metrics is not None:
                        atomic.write_json(out / "metrics.json", _jsonable(metrics))
        except BaseException as e:
            if dist.is_main:
                if isinstance(e, KeyboardInterrupt) and ckpt_path.is_file():
                    done = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"])
                    print(f"testbed: training interrupted; the checkpoint after epoch {done} of {cfg.epochs} is kept in "
                          f"{ckpt_path}; continue with the same command plus --resume", file=sys.stderr)
            raise
    dist.barrier()
    return out


def _say(msg: str) -> None:
    if progress_mod.enabled():
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)


def _run_epoch(net, loader, sampler, opt, sched, scaler, cfg, dist, device, epoch, amp, amp_dtype,
               channels_last, show, ckpt_path) -> dict[str, Any]:
    net.train()
    sampler.set_epoch(epoch)
    torch.manual_seed(_mix(cfg.seed, epoch, dist.rank, "global"))  # dropout etc.: resumable without RNG state
    flip_gen = torch.Generator().manual_seed(_mix(cfg.seed, epoch, dist.rank, "hflip"))
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    seen, steps, t0 = 0, 0, time.perf_counter()
    bar = progress_mod.bar(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}") if show else None

    def check() -> None:
        local_bad = int(bad_step.item())
        if dist.any(local_bad >= 0, device):
            where = f"step {local_bad + 1}" if local_bad >= 0 else "a step on another process"
            kept = (f"last good checkpoint kept at {ckpt_path} (epoch {epoch})" if ckpt_path.is_file()
                    else "no checkpoint was written yet")
            raise UserError(f"loss became NaN at epoch {epoch + 1} {where}; {kept}; lower --lr (now {cfg.lr:g})")

    try:
        for step, (images, labels) in enumerate(loader):
            x, y = _to_device(images, labels, device, channels_last, flip_gen if cfg.hflip else None)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = net(x)
                loss = seg_loss(out["out"], y)
                if cfg.aux_loss and "aux" in out:
                    loss = loss + cfg.aux_weight * seg_loss(out["aux"], y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            ld = loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(ld), step, bad_step)
            loss_sum += ld
            seen += x.shape[0]
            steps += 1
            if steps % cfg.log_every == 0:
                check()
                if bar is not None:
                    rate = seen * dist.world_size / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}", img_s=f"{rate:.0f}")
            if bar is not None:
                bar.update(1)
        check()
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    mean_loss = loss_sum.item() / max(1, steps)
    if dist.enabled:  # the logged loss is the mean over all processes
        t = torch.tensor([mean_loss], device=device)
        torch.distributed.all_reduce(t)
        mean_loss = t.item() / dist.world_size
    return {
        "epoch": epoch + 1,
        "loss": mean_loss,
        "lr": opt.param_groups[0]["lr"],
        "images_per_s": seen * dist.world_size / max(1e-9, seconds),
        "seconds": seconds,
        "steps": steps,
        "images": seen * dist.world_size,
    }
