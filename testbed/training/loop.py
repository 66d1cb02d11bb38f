"""Training a segmentation model on the ``/train`` split of a dataset file (docs/metrics.md; settings: `testbed train --help`).

One plain loop, in the spirit of torchvision's references/segmentation: SGD or AdamW, a poly or one-cycle
schedule stepped per iteration, AMP + channels_last on CUDA, DDP under ``torchrun``.  Reproducibility is
built in rather than bolted on: every random stream (model init, shuffle, flip, dropout) is re-seeded from
``(seed, epoch, rank)`` at the start of each epoch, so a run resumed from an epoch checkpoint needs no RNG
state and ends with the same bytes on CPU as an uninterrupted one.

The settings live in :mod:`testbed.training.config`, the run directory (lock, resume decision, checkpoint I/O) in
:mod:`testbed.training.rundir`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed import models
from testbed.core import atomic
from testbed.core import progress as progress_mod
from testbed.core.device import cpu_bf16_support, resolve_device
from testbed.core.errors import UserError
from testbed.core.guards import check_outputs
from testbed.core.jsonutil import jsonable
from testbed.data import h5data
from testbed.data.h5dataset import SegDataset
from testbed.scoring.scorer import score_model
from testbed.training.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig
from testbed.training.curve import curve_point, write_curve
from testbed.training.heap import kept_heap
from testbed.training.rundir import (CHECKPOINT, RUN_FILES, clear_run_dir, locked_run_dir, plan_run_dir, save_checkpoint,
                                     versions, write_log)
from testbed.training.runs import save_model

# channels_last "auto" on CPU, per precision: measured (BENCHMARKS.md, P9): oneDNN's bf16 kernels gain from it,
# fp32 ones do not (the tiny models' 1x1 convs then still take torch's non-oneDNN path)
CPU_CHANNELS_LAST = {"fp32": False, "bf16": True}
# Whether ``--precision auto`` takes bf16 on a CPU with native bf16.  On since the quality-equivalence table
# (benign mIoU-B and each attack's ASR over 3 seeds of the demo's settings, fp32 vs bf16, with intervals;
# BENCHMARKS.md) showed every pair of intervals overlapping; a CPU without native bf16 stays on fp32.
CPU_AUTO_BF16 = True

__all__ = ["CHECKPOINT", "DEFAULT_LR", "OPTIMIZERS", "RUN_FILES", "SCHEDULES", "TrainConfig", "indices_digest",
           "lr_factor", "make_optimizer", "make_scheduler", "resolve_precision", "seg_loss", "train", "TrainState"]


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



# -- precision ---------------------------------------------------------------------------------
@dataclass
class Precision:
    """How the arithmetic runs: autocast on/off and its dtype, the memory format of images and weights, and why.

    ``name`` (fp32, bf16, fp16) and ``reason`` go into config.json, with the CPU's bf16 flags that decided ``auto``.
    """

    amp: bool
    dtype: torch.dtype
    channels_last: bool
    name: str = "fp32"
    reason: str = ""


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """``cfg.precision``/``amp``/``channels_last`` for this device: CUDA's AMP as before; on CPU, bf16 autocast
    when asked (``bf16``), or for ``auto`` on a CPU with native bf16 (:func:`cpu_bf16_support`) once
    :data:`CPU_AUTO_BF16` is on (it is: BENCHMARKS.md's quality table); elsewhere ``auto`` is fp32."""
    if device.type == "cuda":
        return _cuda_precision(cfg)
    if cfg.amp not in ("auto", False):
        raise UserError("--amp needs a CUDA device; use --no-amp on CPU (--precision bf16 for bf16 autocast on CPU)")
    if cfg.precision == "auto":
        support = cpu_bf16_support()
        bf16 = support["native_bf16"] and CPU_AUTO_BF16
        flags = ", ".join(support["bf16_flags"]) or "no avx512_bf16/amx_bf16 flag"
        reason = (f"auto: {'native' if support['native_bf16'] else 'no native'} bf16 on this CPU ({flags})"
                  + ("" if bf16 or not support["native_bf16"] else
                     "; fp32 until bf16's quality is shown equal to fp32's (BENCHMARKS.md), --precision bf16 to use it"))
    else:
        bf16, reason = cfg.precision == "bf16", f"--precision {cfg.precision}"
    name = "bf16" if bf16 else "fp32"
    channels_last = CPU_CHANNELS_LAST[name] if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return Precision(bf16, torch.bfloat16, channels_last, name, reason)


def _cuda_precision(cfg: TrainConfig) -> Precision:
    clash = ((cfg.precision == "fp32" and cfg.amp not in ("auto", False))
             or (cfg.precision == "bf16" and cfg.amp in (False, "fp16")))
    if clash:
        raise UserError(f"--precision {cfg.precision} contradicts the AMP setting ({cfg.amp!r}); give one of them")
    amp = cfg.precision != "fp32" and (cfg.amp == "auto" or bool(cfg.amp))
    if cfg.amp in ("bf16", "fp16") or cfg.precision == "bf16":
        dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    else:  # bf16 needs no loss scaling; fp16 (older GPUs) gets a GradScaler
        dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    channels_last = True if cfg.channels_last == "auto" else bool(cfg.channels_last)
    name = (str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")) if amp else "fp32"
    return Precision(amp, dtype, channels_last, name, f"CUDA: amp {cfg.amp}, precision {cfg.precision}")


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
    request = _Request(Path(data_path), Path(out_dir), resume, train_indices, progress, overwrite, score)
    dist = _dist_from_env()
    device = _init_dist(dist, cfg.device)
    try:
        with kept_heap(device.type == "cpu"):  # no page faults per step: see testbed.training.heap
            return _train(request, cfg, dist, device)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class _Request:
    """What the caller of :func:`train` asked for besides the settings."""

    data_path: Path
    out: Path
    resume: bool
    train_indices: Sequence[int] | np.ndarray | None
    progress: bool
    overwrite: bool
    score: bool


@dataclass
class _Job:
    """What stays fixed while a run trains: settings, processes, device, precision, where it reads and writes."""

    cfg: TrainConfig
    dist: _Dist
    device: torch.device
    prec: Precision
    data_path: Path
    out: Path
    identity: dict[str, Any]
    show: bool  # this process reports progress

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT


@dataclass
class TrainState:
    """What changes while a run trains: the model (and what the loop calls: DDP-wrapped under torchrun), its
    optimisation state, the data order, and the epochs done so far (from a checkpoint on --resume)."""

    model: nn.Module
    net: nn.Module
    loader: torch.utils.data.DataLoader
    sampler: Any
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


def _train_data(data_path: Path, train_indices, cfg: TrainConfig, dist: _Dist):
    """The dataset file's facts, the (sub)set trained on, and the batch size actually used."""
    with h5data.open_dataset(data_path) as f:
        info = {"classes": f.classes, "num_classes": f.num_classes, "n_total": f.length("train"),
                "image_size": f.image_size, "data_hash": f.content_hash(), "attack": f.attack}
    n_total = info["n_total"]
    indices = None
    if train_indices is not None:
        indices = np.asarray(train_indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= n_total):
            raise UserError(f"train_indices out of range for the {n_total} training samples of {data_path}")
    dataset = SegDataset(data_path, "train", indices=indices)
    n = len(dataset)
    per_rank = math.ceil(n / dist.world_size)
    if per_rank < 2:
        raise UserError(f"{data_path}: only {n} training sample(s) for {dist.world_size} process(es); training needs at least 2 per process")
    batch = min(cfg.batch_size, per_rank)  # BatchNorm needs > 1 sample; never drop every batch
    return info, indices, dataset, batch


def _train(req: _Request, cfg: TrainConfig, dist: _Dist, device: torch.device) -> Path:
    prec = resolve_precision(cfg, device)
    info, indices, dataset, batch = _train_data(req.data_path, req.train_indices, cfg, dist)
    identity = {
        "train": cfg.to_dict(),
        "dataset_hash": info["data_hash"],
        "train_indices": None if indices is None else {"count": int(indices.size), "sha256": indices_digest(indices)},
        "world_size": dist.world_size,
        # what "auto" resolved to on this machine: a --resume elsewhere must not switch arithmetic mid-run
        "precision": {"used": prec.name, "channels_last": prec.channels_last},
    }
    job = _Job(cfg, dist, device, prec, req.data_path, req.out, identity, req.progress and dist.is_main)
    check_outputs({"--out": req.out}, {"the training data": req.data_path})
    with locked_run_dir(req.out, dist):
        ckpt = plan_run_dir(req.out, req.resume, req.overwrite, identity)
        dist.barrier()  # every rank has read RUN/ before rank 0 changes it
        if dist.is_main:
            clear_run_dir(req.out, resuming=ckpt is not None)
        dist.barrier()
        try:
            state = _start(job, info, dataset, batch, ckpt)
            _fit(job, state)
            if dist.is_main:
                facts = {"n_used": len(dataset), "batch": batch}
                _finish(job, state, info, facts, req.score)
        except KeyboardInterrupt as e:  # the command that called says how to go on, in its one line (testbed.cli)
            if dist.is_main and job.ckpt_path.is_file():
                done = int(torch.load(job.ckpt_path, map_location="cpu", weights_only=True)["epoch"])
                e.add_note(f"the checkpoint after epoch {done} of {cfg.epochs} is kept in {job.ckpt_path}")
            raise
    dist.barrier()
    return req.out


def _start(job: _Job, info: dict[str, Any], dataset, batch: int, ckpt: dict[str, Any] | None) -> TrainState:
    """The model, data loader and optimisation state, fresh or loaded from the checkpoint ``ckpt``."""
    cfg = job.cfg
    model, net = _build_model(cfg, info, job.device, job.prec, job.dist)
    loader, sampler = _make_loader(dataset, cfg, batch, job.dist, job.device)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg, len(loader) * cfg.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=job.prec.amp and job.prec.dtype == torch.float16)
    state = TrainState(model, net, loader, sampler, opt, sched, scaler)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.start_epoch, state.log, state.elapsed = int(ckpt["epoch"]), list(ckpt["log"]), float(ckpt["elapsed"])
        if job.show:
            progress_mod.say(f"resuming {job.out} after epoch {state.start_epoch} of {cfg.epochs}")
    return state


def _build_model(cfg: TrainConfig, info: dict[str, Any], device: torch.device, prec: Precision,
                 dist: _Dist) -> tuple[nn.Module, nn.Module]:
    """The model, seeded from ``cfg.seed``, on the device; and what the loop calls (DDP-wrapped under torchrun)."""
    torch.manual_seed(cfg.seed)
    try:
        model = models.create(cfg.model, info["num_classes"], aux_loss=cfg.aux_loss, backbone_weights=cfg.backbone_weights)
        models.check_input_size(model, info["image_size"])  # e.g. smp encoders need sides divisible by 32
    except ValueError as e:  # unknown model, unusable backbone weights, an image size the model cannot take
        raise UserError(str(e)) from None
    model.to(device)
    if prec.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net


def _make_loader(dataset, cfg: TrainConfig, batch: int, dist: _Dist, device: torch.device):
    if dist.enabled:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed % 2**31, drop_last=False
        )
    else:
        sampler = _ShuffleSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
    )
    return loader, sampler


def _fit(job: _Job, state: TrainState) -> None:
    """The epochs from ``state.start_epoch`` on, each followed by a checkpoint (rank 0); fills ``state.log``."""
    cfg, dist = job.cfg, job.dist
    for epoch in range(state.start_epoch, cfg.epochs):
        record = _run_epoch(job, state, epoch)
        state.elapsed += record["seconds"]
        if cfg.val_every and dist.is_main and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            record.update(curve_point(state.model, job.data_path, job.device, max(32, cfg.batch_size)))
        state.log.append(record)
        if dist.is_main:
            _save_epoch(job, state, epoch)
            if job.show:
                progress_mod.say(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, "
                                 f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f}s" + _curve_text(record))
        dist.barrier()


def _save_epoch(job: _Job, state: TrainState, epoch: int) -> None:
    """Rank 0 after an epoch: the checkpoint (what --resume starts from) and train_log.jsonl."""
    ckpt = {
        "model": state.model.state_dict(), "optimizer": state.opt.state_dict(), "scheduler": state.sched.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else {}, "epoch": epoch + 1,
        "log": state.log, "elapsed": state.elapsed, "identity": job.identity,
    }
    save_checkpoint(ckpt, job.ckpt_path)
    write_log(job.out, state.log)


def _cpu_seconds(log: list[dict[str, Any]]) -> float | None:
    """The CPU seconds of the run's epochs (rank 0's process), summed over a resume; None when an epoch has none
    (trained before epochs recorded it)."""
    got = [r.get("cpu_seconds") for r in log]
    return None if not got or None in got else round(sum(got), 3)


def _curve_text(record: dict[str, Any]) -> str:
    if "val_split" not in record:
        return ""
    asr = "" if record["ASR"] is None else f", ASR {record['ASR']:.1f}"
    return f", {record['val_split']} mIoU {record['val_mIoU']:.1f}{asr}"


def _finish(job: _Job, state: TrainState, info: dict[str, Any], facts: dict[str, Any], score: bool) -> None:
    """Rank 0 after the last epoch: weights + config.json, then metrics.json when scoring is on."""
    model, cfg, prec = state.model, job.cfg, job.prec
    model.eval()
    config = {
        "format": "segbackdoor-run",
        "model": cfg.model,
        "num_classes": info["num_classes"],
        "classes": info["classes"],
        "aux_loss": cfg.aux_loss,
        "train": cfg.to_dict(),
        "train_indices": job.identity["train_indices"],
        "dataset": {"path": str(job.data_path.resolve()), "content_hash": info["data_hash"], "attack": info["attack"],
                    "num_train": info["n_total"], "num_used": facts["n_used"]},
        "versions": versions(),
        "device": str(job.device),
        "threads": torch.get_num_threads(),  # CPU results depend on it (same threads ⇒ same bytes)
        "world_size": job.dist.world_size,
        "amp": (str(prec.dtype).removeprefix("torch.") if prec.amp else False),
        "channels_last": prec.channels_last,
        "precision": {"used": prec.name, "memory_format": "channels_last" if prec.channels_last else "contiguous",
                      "why": prec.reason, "cpu": cpu_bf16_support() if job.device.type == "cpu" else None},
        "batch_size_used": facts["batch"],
        "training_seconds": round(state.elapsed, 3),
        "training_cpu_seconds": _cpu_seconds(state.log),
        "final_loss": state.log[-1]["loss"] if state.log else None,
    }
    save_model(model, config, job.out)
    write_curve(job.out, state.log, f"{cfg.model} on {job.data_path.name}, seed {cfg.seed}")
    if score:
        metrics = score_model(model, job.data_path, device=job.device, batch_size=max(32, cfg.batch_size))
        atomic.write_json(job.out / "metrics.json", jsonable(metrics))


@dataclass
class _EpochMeter:
    """One epoch's running totals on the device (read back only every ``log_every`` steps) and its NaN guard."""

    device: torch.device
    seen: int = 0
    steps: int = 0
    loss_sum: torch.Tensor = field(init=False)
    bad_step: torch.Tensor = field(init=False)  # the first step whose loss was not finite, -1 while none
    t0: float = field(init=False)
    cpu0: float = field(init=False)  # this process's CPU time (all its threads) at the epoch's start

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def add(self, loss: torch.Tensor, step: int, images: int) -> None:
        ld = loss.detach()
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(ld), step, self.bad_step)
        self.loss_sum += ld
        self.seen += images
        self.steps += 1


def _check_nan(job: _Job, meter: _EpochMeter, epoch: int) -> None:
    """Stop (on every rank) once the loss of any step on any process was not finite."""
    local_bad = int(meter.bad_step.item())
    if job.dist.any(local_bad >= 0, job.device):
        where = f"step {local_bad + 1}" if local_bad >= 0 else "a step on another process"
        kept = (f"last good checkpoint kept at {job.ckpt_path} (epoch {epoch})" if job.ckpt_path.is_file()
                else "no checkpoint was written yet")
        raise UserError(f"loss became NaN at epoch {epoch + 1} {where}; {kept}; lower --lr (now {job.cfg.lr:g})")


def _step(job: _Job, state: TrainState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimisation step (forward under the precision's autocast, backward, update, lr step): the loss."""
    cfg, prec = job.cfg, job.prec
    with torch.autocast(job.device.type, dtype=prec.dtype, enabled=prec.amp):
        out = state.net(x)
        loss = seg_loss(out["out"], y)
        if cfg.aux_loss and "aux" in out:
            loss = loss + cfg.aux_weight * seg_loss(out["aux"], y)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    state.sched.step()
    return loss


def _run_epoch(job: _Job, state: TrainState, epoch: int) -> dict[str, Any]:
    cfg, dist, device = job.cfg, job.dist, job.device
    state.net.train()
    state.sampler.set_epoch(epoch)
    torch.manual_seed(_mix(cfg.seed, epoch, dist.rank, "global"))  # dropout etc.: resumable without RNG state
    flip_gen = torch.Generator().manual_seed(_mix(cfg.seed, epoch, dist.rank, "hflip")) if cfg.hflip else None
    meter = _EpochMeter(device)
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    bar = progress_mod.bar(total=len(state.loader), desc=desc, closing_line=False) if job.show else None
    try:
        for step, (images, labels) in enumerate(state.loader):
            x, y = _to_device(images, labels, device, job.prec.channels_last, flip_gen)
            meter.add(_step(job, state, x, y), step, x.shape[0])
            if meter.steps % cfg.log_every == 0:
                _check_nan(job, meter, epoch)
                if bar is not None:
                    rate = meter.seen * dist.world_size / max(1e-9, time.perf_counter() - meter.t0)
                    bar.set_postfix(loss=f"{meter.loss_sum.item() / meter.steps:.4f}", img_s=f"{rate:.0f}")
            if bar is not None:
                bar.update(1)
        _check_nan(job, meter, epoch)
    finally:
        if bar is not None:
            bar.close()
    return _epoch_record(job, state, meter, epoch)


def _epoch_record(job: _Job, state: TrainState, meter: _EpochMeter, epoch: int) -> dict[str, Any]:
    """The epoch's line of train_log.jsonl: mean loss (over all processes), lr, images/s, wall and CPU seconds."""
    dist, device = job.dist, job.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - meter.t0, time.process_time() - meter.cpu0
    mean_loss = meter.loss_sum.item() / max(1, meter.steps)
    if dist.enabled:  # the logged loss is the mean over all processes
        t = torch.tensor([mean_loss], device=device)
        torch.distributed.all_reduce(t)
        mean_loss = t.item() / dist.world_size
    return {
        "epoch": epoch + 1,
        "loss": mean_loss,
        "lr": state.opt.param_groups[0]["lr"],
        "images_per_s": meter.seen * dist.world_size / max(1e-9, seconds),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # this process's: with DDP, each rank spends about as much again
        "steps": meter.steps,
        "images": meter.seen * dist.world_size,
    }
