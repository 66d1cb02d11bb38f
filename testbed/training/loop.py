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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testbed.core import atomic
from testbed.data import h5data
from testbed.core import progress as progress_mod
from testbed.core.device import resolve_device
from testbed.core.errors import UserError
from testbed.core.guards import check_outputs
from testbed.core.jsonutil import jsonable
from testbed.training.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig
from testbed.training.rundir import (CHECKPOINT, RUN_FILES, clear_run_dir, locked_run_dir, plan_run_dir, save_checkpoint,
                                  versions, write_log)

__all__ = ["CHECKPOINT", "DEFAULT_LR", "OPTIMIZERS", "RUN_FILES", "SCHEDULES", "TrainConfig", "indices_digest",
           "lr_factor", "make_optimizer", "make_scheduler", "seg_loss", "train"]


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



def _score(model: nn.Module, data_path: Path, device: torch.device, batch_size: int) -> dict[str, Any] | None:
    try:
        from testbed.scoring.scorer import score_model
    except ImportError:
        print("testbed: warning: testbed.scoring.scorer is not available; metrics.json not written", file=sys.stderr)
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


@dataclass
class _Precision:
    """How the arithmetic runs: autocast on/off and its dtype, and the memory format of images and weights."""

    amp: bool
    dtype: torch.dtype
    channels_last: bool


def _precision(cfg: TrainConfig, device: torch.device) -> _Precision:
    use_cuda = device.type == "cuda"
    amp = use_cuda if cfg.amp == "auto" else bool(cfg.amp)
    if amp and not use_cuda:
        raise UserError("--amp needs a CUDA device; use --no-amp on CPU")
    channels_last = use_cuda if cfg.channels_last == "auto" else bool(cfg.channels_last)
    if cfg.amp in ("bf16", "fp16"):
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    else:  # bf16 needs no loss scaling; fp16 (older GPUs) gets a GradScaler
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    return _Precision(amp, amp_dtype, channels_last)


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
    dataset = h5data.SegDataset(data_path, "train", indices=indices)
    n = len(dataset)
    per_rank = math.ceil(n / dist.world_size)
    if per_rank < 2:
        raise UserError(f"{data_path}: only {n} training sample(s) for {dist.world_size} process(es); training needs at least 2 per process")
    batch = min(cfg.batch_size, per_rank)  # BatchNorm needs > 1 sample; never drop every batch
    return info, indices, dataset, batch


def _train(models, data_path, out, cfg, dist, device, resume, train_indices, progress, overwrite, score) -> Path:
    prec = _precision(cfg, device)
    info, indices, dataset, batch = _train_data(data_path, train_indices, cfg, dist)
    identity = {
        "train": cfg.to_dict(),
        "dataset_hash": info["data_hash"],
        "train_indices": None if indices is None else {"count": int(indices.size), "sha256": indices_digest(indices)},
        "world_size": dist.world_size,
    }
    check_outputs({"--out": out}, {"the training data": data_path})
    with locked_run_dir(out, dist):
        ckpt = plan_run_dir(out, resume, overwrite, identity)
        dist.barrier()  # every rank has read RUN/ before rank 0 changes it
        if dist.is_main:
            clear_run_dir(out, resuming=ckpt is not None)
        dist.barrier()
        ckpt_path = out / CHECKPOINT
        try:
            model, net = _build_model(models, cfg, info, device, prec, dist)
            loader, sampler = _make_loader(dataset, cfg, batch, dist, device)
            opt = make_optimizer(model.parameters(), cfg)
            sched = make_scheduler(opt, cfg, len(loader) * cfg.epochs)
            scaler = torch.amp.GradScaler("cuda", enabled=prec.amp and prec.dtype == torch.float16)
            state = _resume_state(ckpt, model, opt, sched, scaler)
            log, elapsed = _fit(net, model, loader, sampler, opt, sched, scaler, cfg, dist, device, prec,
                                progress and dist.is_main, out, identity, state)
            if dist.is_main:
                facts = {"n_used": len(dataset), "batch": batch, "elapsed": elapsed, "log": log}
                _finish(model, cfg, out, data_path, device, dist, prec, identity, info, facts, score)
        except BaseException as e:
            if dist.is_main and isinstance(e, KeyboardInterrupt) and ckpt_path.is_file():
                done = int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"])
                print(f"testbed: training interrupted; the checkpoint after epoch {done} of {cfg.epochs} is kept in "
                      f"{ckpt_path}; continue with the same command plus --resume", file=sys.stderr)
            raise
    dist.barrier()
    return out


def _build_model(models, cfg: TrainConfig, info: dict[str, Any], device: torch.device, prec: _Precision,
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


def _resume_state(ckpt, model, opt, sched, scaler) -> tuple[int, list[dict[str, Any]], float]:
    """``(start_epoch, log, elapsed)``: from the checkpoint (whose states are loaded), or a fresh start."""
    if ckpt is None:
        return 0, [], 0.0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["epoch"]), list(ckpt["log"]), float(ckpt["elapsed"])


def _fit(net, model, loader, sampler, opt, sched, scaler, cfg, dist, device, prec, show, out, identity,
         state) -> tuple[list[dict[str, Any]], float]:
    """The epochs from ``state``'s start on, each followed by a checkpoint (rank 0): the log and total seconds."""
    start_epoch, log, elapsed = state
    ckpt_path = out / CHECKPOINT
    for epoch in range(start_epoch, cfg.epochs):
        record = _run_epoch(net, loader, sampler, opt, sched, scaler, cfg, dist, device, epoch,
                            prec.amp, prec.dtype, prec.channels_last, show, ckpt_path)
        elapsed += record["seconds"]
        log.append(record)
        if dist.is_main:
            ckpt = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "epoch": epoch + 1,
                "log": log, "elapsed": elapsed, "identity": identity,
            }
            save_checkpoint(ckpt, ckpt_path)
            write_log(out, log)
            if show:
                _say(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, "
                     f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f}s")
        dist.barrier()
    return log, elapsed


def _finish(model, cfg, out, data_path, device, dist, prec, identity, info, facts, score) -> None:
    """Rank 0 after the last epoch: weights + config.json, then metrics.json when scoring is on."""
    model.eval()
    log = facts["log"]
    config = {
        "format": "segbackdoor-run",
        "model": cfg.model,
        "num_classes": info["num_classes"],
        "classes": info["classes"],
        "aux_loss": cfg.aux_loss,
        "train": cfg.to_dict(),
        "train_indices": identity["train_indices"],
        "dataset": {"path": str(data_path.resolve()), "content_hash": info["data_hash"], "attack": info["attack"],
                    "num_train": info["n_total"], "num_used": facts["n_used"]},
        "versions": versions(),
        "device": str(device),
        "threads": torch.get_num_threads(),  # CPU results depend on it (same threads ⇒ same bytes)
        "world_size": dist.world_size,
        "amp": (str(prec.dtype).removeprefix("torch.") if prec.amp else False),
        "channels_last": prec.channels_last,
        "batch_size_used": facts["batch"],
        "training_seconds": round(facts["elapsed"], 3),
        "final_loss": log[-1]["loss"] if log else None,
    }
    from testbed.training.runs import save_model

    save_model(model, config, out)
    if score:
        metrics = _score(model, data_path, device, max(32, cfg.batch_size))
        if metrics is not None:
            atomic.write_json(out / "metrics.json", jsonable(metrics))


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
