"""`testbed train`: train a segmentation model on a dataset file's /train split into a RUN/ directory."""

from __future__ import annotations

import argparse
import json

from testbed.core.device import torch_threads
from testbed.core.errors import UserError
from testbed.core.seeds import seed_arg
from testbed.training.config import PRECISIONS
from testbed.training.loop import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig, train

EXAMPLES = """\
examples:
  testbed train poisoned.h5 --model deeplabv3_tiny --epochs 10 --out runs/fgba
  testbed train poisoned.h5 --model deeplabv3_resnet50 --optimizer sgd --schedule poly --lr 0.01 --out runs/r50
  testbed train poisoned.h5 --model deeplabv3_tiny --out runs/fgba --resume      # continue after a crash or Ctrl-C
  torchrun --nproc_per_node 2 -m testbed.cli train poisoned.h5 --model deeplabv3_tiny --out runs/ddp

RUN/ receives model.safetensors, config.json, train_log.jsonl (one line per epoch), metrics.json (the
scores on the file's test splits) and checkpoint.pt (the state after the last finished epoch).
On CPU the same seed gives byte-identical weights, also across --resume. One trainer at a time per RUN/: a
second `testbed train` on it exits with code 2 naming the first (pid and host); DATA.h5 may not lie inside RUN/.
"""


def register(subparsers) -> None:
    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "train",
        help="train a model on a (poisoned or clean) dataset",
        description="Train a segmentation model on the /train split of DATA.h5 (poisoned or clean) and score it "
        "on the file's test splits. SGD or AdamW with a poly or one-cycle schedule stepped per iteration, "
        "AMP + channels_last on CUDA, optional bf16 autocast on CPUs with native bf16 (--precision bf16), DDP "
        "under torchrun, a checkpoint after every epoch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA.h5", help="dataset file (from `testbed data` or `testbed poison`)")
    p.add_argument("--model", required=True, help="model name, e.g. deeplabv3_tiny, deeplabv3_resnet50 (see models.available())")
    p.add_argument("--out", required=True, metavar="RUN/", help="run directory to create")
    p.add_argument("--epochs", type=int, default=d["epochs"].default, help="passes over the training set (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="images per step and process (default %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {DEFAULT_LR['adamw']:g} for adamw, {DEFAULT_LR['sgd']:g} for sgd)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"].default, help="default %(default)s")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"].default,
                   help="poly: warm-up then (1-t)^0.9; onecycle: warm-up then cosine decay (default %(default)s)")
    p.add_argument("--warmup", type=float, default=d["warmup"].default, help="fraction of steps warming up the lr (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, help="default %(default)s")
    p.add_argument("--momentum", type=float, default=d["momentum"].default, help="SGD momentum (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=d["seed"].default, help="seed of init, shuffling and flips (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice); CPU weights depend on it, config.json records it")
    p.add_argument("--workers", type=int, default=d["num_workers"].default, help="DataLoader worker processes (default %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16, or fp16 with loss scaling); default: on for CUDA, off on CPU")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=None,
                   help="AMP precision (implies --amp); default bf16 where the GPU supports it, else fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format; default: on for CUDA and with bf16 on CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default,
                   help="CPU arithmetic: bf16 autocast or fp32; auto = bf16 on a CPU with native bf16 (avx512_bf16 or "
                   "amx_bf16 flags; its quality matched fp32's over 3 seeds, BENCHMARKS.md), else fp32; config.json "
                   "records the choice and why (default %(default)s)")
    p.add_argument("--aux-loss", action="store_true", help="add the auxiliary head's loss (models that have one)")
    p.add_argument("--aux-weight", type=float, default=d["aux_weight"].default, help="weight of the aux loss (default %(default)s)")
    p.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    p.add_argument("--log-every", type=int, default=d["log_every"].default, help="steps between progress/NaN checks (default %(default)s)")
    p.add_argument("--backbone-weights", default=None, help="backbone init: 'imagenet' (torchvision's weights from the local torch hub cache) or a local .safetensors file")
    p.add_argument("--val-every", type=int, default=d["val_every"].default, metavar="K",
                   help="learning curve: val mIoU (and ASR on poisoned data) every K epochs and after the last, into "
                   "RUN/curve.csv, curve.json and curve.png; the file's /val split, else /test (default 0: none)")
    p.add_argument("--resume", action="store_true", help="continue RUN/ from its last checkpoint (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN/")
    p.add_argument("--no-score", action="store_true", help="skip scoring on the test splits (no metrics.json)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay, momentum=args.momentum,
        seed=args.seed, device=args.device,
        amp=args.amp_dtype if args.amp_dtype and args.amp is not False else ("auto" if args.amp is None else args.amp),
        channels_last="auto" if args.channels_last is None else args.channels_last, aux_loss=args.aux_loss,
        aux_weight=args.aux_weight, num_workers=args.workers, hflip=not args.no_hflip, log_every=args.log_every,
        backbone_weights=args.backbone_weights, val_every=args.val_every, precision=args.precision,
    )


def check_threads(threads: int | None) -> None:
    """``--threads`` is absent (torch's choice) or an integer >= 1."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be an integer >= 1, got {threads}")


def run(args: argparse.Namespace) -> int:
    import os

    check_threads(args.threads)
    cfg = config_from_args(args)
    with torch_threads(args.threads):
        out = train(args.data, args.out, cfg, resume=args.resume, overwrite=args.overwrite, score=not args.no_score)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = log[-1] if log else {}
    print(f"trained {cfg.model} for {cfg.epochs} epochs: final loss {last.get('loss', float('nan')):.4f}, "
          f"{last.get('images_per_s', 0):.0f} img/s → {out}")
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        keys = [k for k in ("mIoU-B", "PA-B", "mIoU-A", "PA-A", "ASR", "PBA") if m.get(k) is not None]
        print("  " + ", ".join(f"{k} {m[k]:.2f}" for k in keys))
    return 0
