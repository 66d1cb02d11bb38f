"""P9: the trainer's CPU images/s on its fast path ÷ the same trainer in plain fp32 (the path ``--precision auto``
picks where the CPU has native bf16; elsewhere the best layout available).

Same model, data, batch size, seed and thread count; each side is a whole `testbed.training.loop.train()` call
(scoring off) and its images/s is taken over the epochs as logged (the per-epoch time, which excludes model build
and file checks).  ``auto`` takes bf16 autocast (+ channels_last) only on a CPU whose flags say native bf16
(AVX512-BF16 or AMX-BF16); on a CPU without them ``auto`` is fp32 (auto ÷ fp32 ~1 by construction), so the P9
ratio is that of the best available path (the fastest layout timed) ÷ fp32, named on the next line.  Every layout
(fp32/bf16, contiguous/channels_last) is timed and printed (without native bf16 the emulated bf16 ones only with
``--all-layouts``).  Rounds alternate the order; the ratio is the median over rounds of the path's images/s ÷
fp32's within a round, also per CPU-second (robust to other load on a shared machine with one thread).  A last
line gives the ceiling: P3's bare loop (no trainer at all: data in memory, no flips, checkpoints or bookkeeping)
on the same path ÷ the same loop in fp32, per CPU-second — what the arithmetic alone allows, so the most the
trainer's ratio can reach (``--no-ceiling`` skips it).

    .venv/bin/python benchmarks/p9_cpu_fast_path.py [--images 256] [--epochs 2] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's testbed, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark P3 (run_all runs from the repo root)

TARGET = 1.5
# name → (precision, channels_last); "auto" is what a user gets without flags
LAYOUTS = {"fp32": ("fp32", False), "fp32_cl": ("fp32", True), "bf16": ("bf16", False), "bf16_cl": ("bf16", True),
           "auto": ("auto", "auto")}


def trainer(data: Path, out: Path, layout: str, args: argparse.Namespace) -> tuple[float, float, dict]:
    """(images/s over the logged epochs, images per CPU-second of the whole call, the run's precision record)."""
    from testbed.training.loop import TrainConfig, train

    precision, channels_last = LAYOUTS[layout]
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, seed=0, device="cpu",
                      precision=precision, channels_last=channels_last)
    shutil.rmtree(out, ignore_errors=True)
    c0 = time.process_time()
    train(data, out, cfg, progress=False, score=False)
    cpu = time.process_time() - c0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    images = sum(r["images"] for r in log)
    used = json.loads((out / "config.json").read_text())["precision"]
    return images / sum(r["seconds"] for r in log), images / cpu, used


def best_path(rates: dict[str, list], native_bf16: bool) -> str:
    """The layout P9's ratio is taken for: ``auto`` on a CPU with native bf16 (the path users get); on one without,
    ``auto`` is fp32 by construction, so the fastest explicit layout timed (median images/s; ``fp32`` itself
    when nothing beats it)."""
    return "auto" if native_bf16 else max((n for n in rates if n != "auto"), key=lambda n: statistics.median(rates[n]))


def timed_layouts(native_bf16: bool, all_layouts: bool) -> list[str]:
    """The layouts a run times: all of them on a CPU with native bf16 (or with ``--all-layouts``); without it the
    bf16 ones are left out — emulated, 1/12 of fp32's speed on an AMD EPYC (BENCHMARKS.md), never ``auto``'s
    choice there, and most of the benchmark's time."""
    return [n for n in LAYOUTS if native_bf16 or all_layouts or LAYOUTS[n][0] != "bf16"]


def over_fp32(rates: dict[str, list], name: str) -> list[float]:
    """``name``'s rate ÷ fp32's, round by round."""
    return [a / b for a, b in zip(rates[name], rates["fp32"])]


def _report(rates: dict[str, list], cpu_rates: dict[str, list], used: dict, args: argparse.Namespace,
            cpu: dict) -> str:
    """Print the P9 line and the details (``cpu``: :func:`cpu_bf16_support`); return the layout the ratio was
    taken for."""
    ratios, cpu_ratios = over_fp32(rates, "auto"), over_fp32(cpu_rates, "auto")
    best = best_path(rates, cpu["native_bf16"])
    best_ratios, best_cpu = over_fp32(rates, best), over_fp32(cpu_rates, best)
    print(f"P9 cpu_fast_path_vs_fp32 ratio={statistics.median(best_ratios):.2f} target>={TARGET}")
    if not cpu["native_bf16"]:
        print(f"  no native bf16 on this CPU: the ratio is the best available path ({best}) ÷ fp32 (per round: "
              f"{', '.join(f'{x:.3f}' for x in best_ratios)}; per CPU-second median {statistics.median(best_cpu):.3f}; "
              "the faster of noisy layouts, so read it against its rounds); auto is fp32 here, auto ÷ fp32 = "
              f"{statistics.median(ratios):.2f}" + ("" if "bf16" in rates else
                                                    "; bf16 layouts not timed (emulated; --all-layouts times them)"))
    print(f"  CPU: {cpu['model']}; bf16 flags: {', '.join(cpu['bf16_flags']) or 'none (no avx512_bf16/amx_bf16)'}; "
          f"amx_tile: {cpu['amx_tile']}; torch capability: {cpu['capability']}; native bf16: {cpu['native_bf16']}")
    auto = used["auto"]
    print(f"  auto picked: {auto['used']} {auto['memory_format']} ({auto['why']})")
    print(f"  model={args.model} images={args.images} size={args.size} epochs={args.epochs} batch={args.batch_size} "
          f"threads={args.threads} rounds={args.rounds}")
    print(f"  auto / fp32 per round: {', '.join(f'{x:.3f}' for x in ratios)}; per CPU-second: median "
          f"{statistics.median(cpu_ratios):.3f} ({', '.join(f'{x:.3f}' for x in cpu_ratios)})")
    for name in rates:
        print(f"  {name:<8} img/s (epochs): median {statistics.median(rates[name]):.1f} "
              f"({', '.join(f'{x:.1f}' for x in rates[name])}); img per CPU-s median {statistics.median(cpu_rates[name]):.1f}")
    return best


def ceiling(data: Path, args: argparse.Namespace, path: str) -> None:
    """Print P3's bare loop on ``path`` (the layout P9's ratio was taken for) ÷ the same loop in fp32, per
    CPU-second, ``args.rounds`` alternating rounds (after one warm-up each)."""
    from p3_train import bare_loop  # the sibling benchmark's loop

    from testbed.data import h5data
    from testbed.training.loop import TrainConfig

    with h5data.open_dataset(data) as f:
        images, labels = torch.from_numpy(f["train/images"]), torch.from_numpy(f["train/labels"])
        k = f.num_classes
    cfgs = {n: TrainConfig(model=args.model, batch_size=args.batch_size, device="cpu", precision=LAYOUTS[n][0],
                           channels_last=LAYOUTS[n][1]) for n in dict.fromkeys(("fp32", path))}
    for cfg in cfgs.values():
        bare_loop(cfg, images[: 4 * args.batch_size], labels[: 4 * args.batch_size], k, 1)
    rates: dict[str, list[float]] = {n: [] for n in cfgs}
    for r in range(args.rounds):
        for n in (list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]):
            rates[n].append(bare_loop(cfgs[n], images, labels, k, args.epochs)[1])
    ratios = over_fp32(rates, path)
    print(f"  ceiling (P3's bare loop, no trainer): {path} / fp32 per CPU-second median {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.3f}' for x in ratios)}); img per CPU-s fp32 {statistics.median(rates['fp32']):.1f}, "
          f"{path} {statistics.median(rates[path]):.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv3_tiny")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the demo's batch size (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-warmup", action="store_true", help="time from the first call (kernels' first calls included)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the bare-loop ceiling line")
    p.add_argument("--all-layouts", action="store_true",
                   help="also time the bf16 layouts on a CPU without native bf16 (emulated: slow)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(images=16, size=32, epochs=1, rounds=1, no_warmup=True)

    from testbed.core.device import cpu_bf16_support, torch_threads
    from testbed.data.synth import make_synth_dataset

    cpu_info = cpu_bf16_support()
    names = timed_layouts(cpu_info["native_bf16"], args.all_layouts or args.smoke)
    tmp = Path(tempfile.mkdtemp(prefix="p9-"))
    try:
        with torch_threads(args.threads):
            data = make_synth_dataset(tmp / "synth.h5", n_train=args.images, n_test=8, size=args.size, seed=0)
            rates: dict[str, list] = {n: [] for n in names}
            cpu_rates: dict[str, list] = {n: [] for n in names}
            used: dict[str, dict] = {}
            # warm-up: the first calls of every kernel (oneDNN builds its primitives) are not what is timed
            for name in [] if args.no_warmup else names:
                trainer(data, tmp / "warm", name, argparse.Namespace(**{**vars(args), "epochs": 1}))
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    wall, cpu, used[name] = trainer(data, tmp / "run", name, args)
                    rates[name].append(wall)
                    cpu_rates[name].append(cpu)
            best = _report(rates, cpu_rates, used, args, cpu_info)
            if not args.no_ceiling:
                ceiling(data, args, best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
