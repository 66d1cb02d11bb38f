"""P7: trigger synthesis batched across candidates ÷ one candidate at a time, per candidate (K = 11, CPU).

Run: `.venv/bin/python benchmarks/p7_trigger_synthesis_batched.py [--k 11] [--size 64] [--clean 16] [--batch 8] [--steps 6] [--rounds 2] [--threads 0,1]`.
A seeded random ``deeplabv3_tiny`` with K classes searches its K image-level candidates twice per round:
``candidate_batch=1`` (sequential: one candidate's batch per forward/backward) and ``candidate_batch=K``
(all candidates' batches stacked in one forward/backward), interleaved, ``--rounds`` rounds, each mode's
best round kept.  Early stop is off and every candidate runs ``--steps`` steps, so both modes do exactly the
same passes.  Ratio = sequential seconds per candidate ÷ batched seconds per candidate (higher = batching
wins).  The P-line is at the first ``--threads`` setting (0 = torch's default, all cores); a detail line per
setting, and a check that both modes gave the same verdict and norms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark P5 (run_all runs from the repo root)


def one(model, ctx, steps: int, batch: int, candidate_batch: int):
    from testbed.defenses.trigger_synthesis import TriggerSynthesis

    ts = TriggerSynthesis(steps=steps, batch_size=batch, early_stop=False, candidate_batch=candidate_batch)
    res = ts.run(model, ctx)
    cost = res.details["cost"]  # the candidate loop's seconds: the same preliminaries in both modes are left out
    return res, cost["loop_seconds"] / cost["candidates_run"]


def measure(k: int, size: int, clean: int, batch: int, steps: int, rounds: int, threads: int) -> dict:
    from p5_trigger_synthesis import setup

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        model, ctx = setup(k, size, clean, torch.device("cpu"))
        seq, bat = [], []
        for _ in range(rounds):
            rs, s = one(model, ctx, steps, batch, 1)
            rb, b = one(model, ctx, steps, batch, k)
            seq.append(s)
            bat.append(b)
        a, b = rs.details["norms"], rb.details["norms"]
        rel = max(abs(a[c] - b[c]) / max(abs(a[c]), 1e-12) for c in a)
        return {"threads": torch.get_num_threads(), "seq_s": min(seq), "bat_s": min(bat), "ratio": min(seq) / min(bat),
                "same_verdict": rs.verdict.status == rb.verdict.status and rs.verdict.suspected == rb.verdict.suspected,
                "norm_rel_diff": rel, "passes": rs.cost.forward_passes + rs.cost.backward_passes}
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=11)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--clean", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="clean images per step and candidate")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="0,1", help="torch CPU thread settings to measure (0 = torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs; its ratio means nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(k=2, size=32, clean=4, batch=2, steps=2, rounds=1, threads="1")
    rows = [measure(args.k, args.size, args.clean, args.batch, args.steps, args.rounds, int(t))
            for t in args.threads.split(",")]
    print(f"P7 ts_batched_vs_sequential ratio={rows[0]['ratio']:.2f} target>=3")
    for r in rows:
        print(f"  threads={r['threads']} sequential={r['seq_s']:.3f}s/candidate batched={r['bat_s']:.3f}s/candidate "
              f"ratio={r['ratio']:.2f}  same verdict={r['same_verdict']} max norm rel. diff={r['norm_rel_diff']:.1e} "
              f"passes per mode={r['passes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
