"""P6: STRIP throughput vs plain inference ÷ N (batched overlays), side by side in one run.

Run: `.venv/bin/python benchmarks/p6_strip.py [--images 8] [--overlays 32] [--size 64] [--batch 256] [--device cpu] [--threads 1]`.
A ``deeplabv3_tiny`` (11 classes, random weights, seeded) scores ``--images`` inputs with STRIP (N overlays
each, ``--batch`` overlaid images per forward) and, on the same number of forwarded images, runs plain
inference in batches of ``--batch``.  STRIP can at best reach plain inference ÷ N images/s; the ratio
``STRIP images/s ÷ (plain images/s ÷ N)`` says how much the blending, entropy and scoring add.  Interleaved, best of
``--repeat`` each.  Prints ``P6 strip_vs_inference ratio=X target>=0.8``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--overlays", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(images=2, overlays=4, size=32, repeat=1)
    torch.set_num_threads(args.threads)
    from testbed import models
    from testbed.defenses.strip import Strip
    from testbed.defense import DefenseContext

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create("deeplabv3_tiny", 11).to(device).eval()
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (16, args.size, args.size, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    ctx = DefenseContext(clean, np.zeros(clean.shape[:3], np.uint8), tuple(f"c{i}" for i in range(11)), device,
                         image_size=(args.size, args.size))
    scorer = Strip(n_overlays=args.overlays, batch_size=args.batch).scorer(model, ctx)
    forwarded = np.repeat(images, args.overlays, axis=0)  # the same number of images plain inference must push

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def strip_run():
        scorer(images)
        sync()

    @torch.inference_mode()
    def plain_run():
        for s in range(0, len(forwarded), args.batch):
            x = torch.from_numpy(forwarded[s : s + args.batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
            model(x)["out"].argmax(1)
        sync()

    # interleaved, best of --repeat each: on a shared machine the load drifts, and alternating keeps both
    # sides under the same conditions
    plain_run(), strip_run()  # warm-up
    t_plain = t_strip = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        plain_run()
        t_plain = min(t_plain, time.perf_counter() - t)
        t = time.perf_counter()
        strip_run()
        t_strip = min(t_strip, time.perf_counter() - t)
    plain_ips = len(forwarded) / t_plain
    strip_ips = args.images / t_strip
    ratio = strip_ips / (plain_ips / args.overlays)
    print(f"P6 strip_vs_inference ratio={ratio:.3f} target>=0.8")
    print(f"  STRIP {strip_ips:.1f} images/s (N={args.overlays}, {scorer.per_forward} images/forward); "
          f"plain inference {plain_ips:.1f} images/s; bound plain/N = {plain_ips / args.overlays:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
