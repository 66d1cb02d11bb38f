"""P8: independent trainings side by side with 1 thread each ÷ one after the other with all the threads.

Why: tiny models at small batches are dominated by per-step overhead that extra intra-op threads do not
shorten, so on a small CPU two models trained at once (1 thread each) finish sooner than the same two trained
one after the other with 2 threads each — which is why `testbed zoo build --workers auto` and `testbed demo`
run one 1-thread process per core.  Measured here, not assumed:

- ``1x2``: one job at a time with 2 threads: model A, then model B;
- ``2x1``: two jobs at once with 1 thread each (A and B side by side);
- ``2x2``: two jobs at once with 2 threads each (oversubscribed on 2 cores: OpenMP threads spin-wait on each
  other, so this layout can be 10× slower and its time varies wildly; it runs in one round only unless ``--all-2x2``).

Each job is a whole `testbed.training.loop.train()` call (scoring off) of the same model and data with seeds 0 and 1,
in two long-lived spawned processes (warmed up first, so imports and first-call costs are not timed).  The
three layouts alternate in every round (the order rotates); images/s = images of both jobs ÷ wall seconds of
the layout; the ratio is the median over rounds of 2x1 ÷ 1x2 within a round.

    .venv/bin/python benchmarks/p8_parallel_jobs.py [--images 320] [--epochs 2] [--batch-size 8] [--rounds 3] [--all-2x2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 1.5
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}  # name → (jobs at once, threads per job)


def _job(data: str, out: str, model: str, epochs: int, batch_size: int, seed: int, threads: int) -> int:
    """One training in a worker process; returns the images it trained on (from its log)."""
    import json

    import torch

    from testbed.training.loop import TrainConfig, train

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, seed=seed, device="cpu")
    train(data, out, cfg, progress=False, score=False)
    log = Path(out, "train_log.jsonl").read_text().splitlines()
    shutil.rmtree(out, ignore_errors=True)
    return sum(json.loads(line)["images"] for line in log)


def _importable_job():
    """``_job`` as a spawned worker can import it: `run_all.py` loads this file under another module name."""
    import importlib
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # spawned workers inherit sys.path
    return importlib.import_module(Path(__file__).stem)._job


def _layout(pool: cf.ProcessPoolExecutor, name: str, data: Path, tmp: Path, args: argparse.Namespace) -> float:
    """images/s of one layout: both seeds' trainings, at once or one after the other."""
    job = _importable_job()
    jobs, threads = LAYOUTS[name]
    threads = min(threads, args.max_threads)
    calls = [(str(data), str(tmp / f"run-{name}-{seed}"), args.model, args.epochs, args.batch_size, seed, threads)
             for seed in (0, 1)]
    t0 = time.perf_counter()
    if jobs == 1:
        images = sum(pool.submit(job, *c).result() for c in calls)
    else:
        images = sum(f.result() for f in [pool.submit(job, *c) for c in calls])
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deeplabv3_tiny")
    p.add_argument("--images", type=int, default=320, help="training images per job (default 320)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the demo's batch size (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--all-2x2", action="store_true", help="time 2x2 in every round (default: the second round only)")
    p.add_argument("--max-threads", type=int, default=2, help="cap on threads per job (default 2: the layouts as named)")
    p.add_argument("--no-2x2", action="store_true", help="do not time 2x2 (the oversubscribed layout)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(images=16, size=32, epochs=1, rounds=1, no_2x2=True, max_threads=1)  # 2 threads crawl on a loaded machine

    from testbed.data.synth import make_synth_dataset

    tmp = Path(tempfile.mkdtemp(prefix="p8-"))
    pool = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
    try:
        data = make_synth_dataset(tmp / "synth.h5", n_train=args.images, n_test=8, size=args.size, seed=0)
        warm = [pool.submit(_importable_job(), str(data), str(tmp / f"warm-{i}"), args.model, 1, args.batch_size, i, 1) for i in (0, 1)]
        [w.result() for w in warm]  # both workers imported torch and ran a step before anything is timed
        names = [n for n in LAYOUTS if not (n == "2x2" and args.no_2x2)]
        rates: dict[str, list[float]] = {n: [] for n in names}
        ratios = []
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name != "2x2" or args.all_2x2 or r == min(1, args.rounds - 1):
                    rates[name].append(_layout(pool, name, data, tmp, args))
            ratios.append(rates["2x1"][-1] / rates["1x2"][-1])
        ratio = statistics.median(ratios)
        print(f"P8 parallel_jobs_vs_threads ratio={ratio:.2f} target>={TARGET}")
        print(f"  model={args.model} images={args.images} size={args.size} epochs={args.epochs} batch={args.batch_size} "
              f"rounds={args.rounds}; 2 jobs (seeds 0, 1), each a whole train() call")
        for name in names:
            jobs, threads = LAYOUTS[name]
            xs = rates[name]
            print(f"  {name} ({jobs} job{'s' if jobs > 1 else ''} at once x {threads} thread{'s' if threads > 1 else ''}): "
                  f"median {statistics.median(xs):.1f} img/s  (rounds: {', '.join(f'{x:.1f}' for x in xs)})")
        over = (f"; 2x2 / 1x2 {statistics.median(rates['2x2']) / statistics.median(rates['1x2']):.2f}"
                if "2x2" in rates else "")
        print(f"  2x1 / 1x2 per round: {', '.join(f'{x:.2f}' for x in ratios)}{over}")
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
