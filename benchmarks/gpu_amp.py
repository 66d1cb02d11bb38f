"""GPU: training images/s with AMP + channels_last ÷ plain fp32, DeepLabv3-ResNet50 at 512².

The two settings run the trainer's own step (``testbed.training.loop``: the same input conversion, loss, autocast
and GradScaler logic) on synthetic random data already on the GPU, after a warm-up, timed with
``torch.cuda.synchronize``.  Prints a skip line when no CUDA device is present.

    .venv/bin/python benchmarks/gpu_amp.py [--batch-size 8] [--steps 20] [--warmup 5] [--size 512]
"""

from __future__ import annotations

import argparse
import time

import torch

TARGET = 1.5


def measure(model_name: str, amp: bool, channels_last: bool, batch_size: int, size: int, steps: int, warmup: int,
            num_classes: int = 21) -> float:
    from testbed import models
    from testbed.training.loop import seg_loss

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = models.create(model_name, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(0, num_classes, (batch_size, size, size), dtype=torch.uint8, device=device, generator=g)

    def step() -> None:
        x = images.permute(0, 3, 1, 2).float().div_(255)  # NHWC storage: already channels_last strides
        if not channels_last:
            x = x.contiguous()
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            loss = seg_loss(model(x)["out"], labels.long())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * batch_size / (time.perf_counter() - t0)
    del model, opt
    torch.cuda.empty_cache()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv3_resnet50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("GPU amp_cl_vs_fp32 skipped: no CUDA device here (run on a machine with a GPU)")
        return 0
    torch.backends.cudnn.benchmark = True
    common = dict(batch_size=args.batch_size, size=args.size, steps=args.steps, warmup=args.warmup)
    # headline against PyTorch's default fp32 (cuDNN may use TF32 for convolutions): the conservative ratio
    fp32 = measure(args.model, amp=False, channels_last=False, **common)
    fast = measure(args.model, amp=True, channels_last=True, **common)
    amp_only = measure(args.model, amp=True, channels_last=False, **common)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    strict = measure(args.model, amp=False, channels_last=False, **common)
    torch.backends.cudnn.allow_tf32 = tf32
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    print(f"GPU amp_cl_vs_fp32 ratio={fast / fp32:.2f} target>={TARGET}")
    print(f"  {torch.cuda.get_device_name()} model={args.model} {args.size}x{args.size} batch={args.batch_size} "
          f"steps={args.steps} (after {args.warmup} warm-up) amp dtype={dtype}")
    print(f"  fp32 (PyTorch defaults): {fp32:.1f} img/s; amp+channels_last: {fast:.1f} img/s; amp only: {amp_only:.1f} img/s")
    print(f"  fp32 with TF32 off: {strict:.1f} img/s (amp+channels_last ratio vs it: {fast / strict:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
