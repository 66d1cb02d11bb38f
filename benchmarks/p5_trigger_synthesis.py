"""P5: trigger-synthesis cost projection vs measurement on a K sweep (K = 4, 8, 16).

Run: `.venv/bin/python benchmarks/p5_trigger_synthesis.py [--size 32] [--steps 25] [--clean 8] [--batch 4] [--device cpu] [--threads 1]`.
For each K a fresh ``deeplabv3_tiny`` with K classes (random weights, seeded: the cost does not depend on
what the model learned) runs the trigger-synthesis defense over all K image-level candidates.  The defense
projects the cost of the whole sweep from its first candidate (first candidate's seconds × K); the measured
cost is the wall time of the candidate loop (the sum of all candidates' seconds).  Prints
``P5 ts_projection_error max_rel_err=X target<=0.25`` then one detail line per K.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def measure(k: int, size: int, steps: int, clean: int, batch: int, device: torch.device, seed: int = 0) -> dict:
    from testbed import models
    from testbed.defenses.trigger_synthesis import TriggerSynthesis
    from testbed.defense import DefenseContext

    torch.manual_seed(seed)
    model = models.create("deeplabv3_tiny", k).to(device).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (clean, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, k, (clean, size, size), dtype=np.uint8)
    ctx = DefenseContext(images, labels, tuple(f"c{i}" for i in range(k)), device, seed=seed, image_size=(size, size))
    t0 = time.perf_counter()
    res = TriggerSynthesis(targets="image", steps=steps, batch_size=batch).run(model, ctx)
    wall = time.perf_counter() - t0
    cost = res.details["cost"]
    assert cost["candidates_run"] == k, cost["candidates_run"]
    projected = cost["projected"]["image_seconds"]
    measured = cost["per_candidate_seconds"] * cost["candidates_run"]
    return {"K": k, "projected_s": projected, "measured_s": measured, "wall_s": wall,
            "per_candidate_s": cost["first_candidate_seconds"], "rel_err": abs(projected - measured) / measured,
            "ade20k_pairs_s": cost["projected_ade20k"]["pairs_seconds"], "log10_maps": cost["counts"]["log10_maps"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--clean", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ks", default="4,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(int(k), args.size, args.steps, args.clean, args.batch, device) for k in args.ks.split(",")]
    worst = max(r["rel_err"] for r in rows)
    print(f"P5 ts_projection_error max_rel_err={worst:.3f} target<=0.25")
    for r in rows:
        print(f"  K={r['K']:>3} projected={r['projected_s']:.2f}s measured={r['measured_s']:.2f}s rel_err={r['rel_err']:.3f} "
              f"per_candidate={r['per_candidate_s']:.3f}s wall={r['wall_s']:.2f}s  "
              f"ADE20K pairs≈{r['ade20k_pairs_s'] / 86400:.1f} days  log10(K^(H·W))={r['log10_maps']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
