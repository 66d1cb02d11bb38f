"""P5: trigger-synthesis cost projection vs measurement on a K sweep (K = 4, 8, 16).

Run: `.venv/bin/python benchmarks/p5_trigger_synthesis.py [--size 32] [--steps 25] [--clean 8] [--batch 4] [--device cpu] [--threads 1]`.
For each K a fresh ``deeplabv3_tiny`` with K classes (random weights, seeded: the cost does not depend on
what the model learned) is searched twice over its K image-level candidates, one candidate at a time
(``candidate_batch=1``: the seconds per pass stay those of one candidate, whatever K):
1. a partial search over the first ``max(2, K // 4)`` candidates, as a budget would leave it; the defense
   projects the whole search from what it measured: passes per candidate (mean; candidates stop early at
   different steps) × K × seconds per pass;
2. the full search over all K candidates: the measured cost is its candidate loop's wall seconds.
Prints ``P5 ts_projection_error max_rel_err=X target<=0.25`` then one detail line per K, with the passes
projected vs measured (machine-independent) and how many candidates stopped early (NC's rule) vs at ``--steps``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def setup(k: int, size: int, clean: int, device: torch.device, seed: int = 0):
    from testbed import models
    from testbed.defense import DefenseContext

    torch.manual_seed(seed)
    model = models.create("deeplabv3_tiny", k).to(device).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (clean, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, k, (clean, size, size), dtype=np.uint8)
    ctx = DefenseContext(images, labels, tuple(f"c{i}" for i in range(k)), device, seed=seed, image_size=(size, size))
    return model, ctx


def measure(k: int, size: int, steps: int, clean: int, batch: int, device: torch.device) -> dict:
    from testbed.defenses.trigger_synthesis import TriggerSynthesis

    model, ctx = setup(k, size, clean, device)
    m = max(2, k // 4)
    part = TriggerSynthesis(targets="image", steps=steps, batch_size=batch, candidate_batch=1, max_candidates=m).run(model, ctx)
    t0 = time.perf_counter()
    full = TriggerSynthesis(targets="image", steps=steps, batch_size=batch, candidate_batch=1).run(model, ctx)
    wall = time.perf_counter() - t0
    pc, fc = part.details["cost"], full.details["cost"]
    assert pc["candidates_run"] == m and fc["candidates_run"] == k, (pc["candidates_run"], fc["candidates_run"])
    projected, measured = pc["projected"]["image_seconds"], fc["loop_seconds"]
    stops = list(full.details["stop_reason"].values())
    return {"K": k, "from": m, "projected_s": projected, "measured_s": measured, "wall_s": wall,
            "rel_err": abs(projected - measured) / measured,
            "projected_passes": pc["projected"]["image_passes"], "measured_passes": fc["loop_passes"],
            "converged": stops.count("converged"), "max_steps": stops.count("max_steps"),
            "ade20k_pairs_s": pc["projected_ade20k"]["pairs_seconds"], "log10_maps": pc["counts"]["log10_maps"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25, help="the most steps per candidate (NC's early stop may end sooner)")
    ap.add_argument("--clean", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(steps=2, clean=4, batch=2, ks="4")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(int(k), args.size, args.steps, args.clean, args.batch, device) for k in args.ks.split(",")]
    worst = max(r["rel_err"] for r in rows)
    print(f"P5 ts_projection_error max_rel_err={worst:.3f} target<=0.25")
    for r in rows:
        print(f"  K={r['K']:>3} projected from {r['from']} candidates={r['projected_s']:.2f}s measured={r['measured_s']:.2f}s "
              f"rel_err={r['rel_err']:.3f} passes projected={r['projected_passes']:.0f} measured={r['measured_passes']} "
              f"stopped early={r['converged']} at max steps={r['max_steps']} wall={r['wall_s']:.2f}s  "
              f"ADE20K pairs≈{r['ade20k_pairs_s'] / 86400:.1f} days (estimate)  log10 target-map space={r['log10_maps']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
