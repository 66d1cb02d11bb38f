"""The repair defenses at their defaults on the tests' BadNets-line fixture, over seeds (docs/defenses.md,
"Revision 2, three seeds (measured)"): the measurement behind issue 22's positive-test question.

Usage:
    python docs/make_repair_fixture.py                       # seeds 0-2, every repair defense, defense seed = seed
    python docs/make_repair_fixture.py --defenses nad --defense-seeds 0,1,2     # nad's spread over defense seeds

The fixture is tests/conftest.py's: synthetic scenes 240 train / 48 test at 64×64 (data seed 0, fixed), BadNets
with the line trigger at 10%, deeplabv3_tiny 6 epochs batch 16 fp32.  Seed s sets the poisoning seed (which also
draws the defender's 12-image /defense/clean_index), the training seed and, unless --defense-seeds is given, the
runner's defense seed; the fixture pins all three at 0.  One record per (seed, defense, revision, defense seed) is
appended to --out (JSON lines) with the CPU, torch version, thread count and git commit; a record already there is
not run again, so a killed run resumes (a half-written last line is ignored).  One torch thread (the tests use
two: seed 0 has the fixture's settings, not necessarily its bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from testbed import attacks
from testbed.core.device import cpu_bf16_support
from testbed.data.synth import make_synth_dataset
from testbed.defenses.registry import load_defense
from testbed.evaluation.loaded import load_pair
from testbed.evaluation.runner import DefenseSettings, run_defense
from testbed.training.loop import TrainConfig, train

OUT = Path(__file__).parent / "results/synthetic/findings/repair-fixture-badnets-line-rev2/results.jsonl"
REPAIR = "clp,i-bau,nad,ft,fine-pruning,anp"


def fixture(work: Path, seed: int) -> tuple[Path, Path]:
    """The BadNets-line data and trained run of ``seed`` under ``work`` (built once)."""
    synth = work / "synth.h5"
    if not synth.exists():
        make_synth_dataset(synth, n_train=240, n_test=48, size=64, seed=0)
    data = work / f"badnets-line-s{seed}.h5"
    if not data.exists():
        attacks.poison_file(synth, data, attack="badnets", trigger="line", rate=0.1, seed=seed)
    run_dir = work / f"run-s{seed}"
    if not (run_dir / "config.json").exists():
        cfg = TrainConfig(model="deeplabv3_tiny", epochs=6, batch_size=16, seed=seed, device="cpu", precision="fp32")
        train(data, run_dir, cfg, progress=False)
    return run_dir, data


def record(run, defense, seed: int, defense_seed: int, env: dict) -> dict:
    """One defense (loaded at its defaults) on a loaded pair: before/after, cost, the small details, ``env``."""
    t0 = time.perf_counter()
    row = run_defense(defense, run, DefenseSettings(seed=defense_seed, panels=0))
    details = {k: v for k, v in (row.details or {}).items()
               if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 300}
    before, after = row.before or {}, row.after or {}
    return {"seed": seed, "defense_seed": defense_seed, "defense": defense.name, "revision": getattr(defense, "revision", None),
            "error": row.error, "ASR_before": before.get("ASR"), "mIoU_B_before": before.get("mIoU-B"),
            "ASR_after": after.get("ASR"), "mIoU_B_after": after.get("mIoU-B"),
            "fwd": row.cost.forward_passes, "bwd": row.cost.backward_passes, "seconds": row.cost.seconds,
            "wall_incl_scoring": round(time.perf_counter() - t0, 1), "details": details, **env}


def environment() -> dict:
    """Where a record was measured: CPU, torch, threads, the repository's commit."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                         text=True, check=False)
    return {"cpu": cpu_bf16_support()["model"], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "commit": git.stdout.strip() or None}


def finished(out: Path) -> set[tuple]:
    """The (seed, defense, revision, defense seed) keys already in ``out``; a half-written last line is skipped."""
    keys = set()
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.add((r["seed"], r["defense"], r.get("revision"), r.get("defense_seed", r["seed"])))
    return keys


def start(a: argparse.Namespace) -> tuple[set[tuple], dict]:
    """One torch thread, the work and output folders made; (the records already in ``a.out``, the environment)."""
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    return finished(a.out), environment()


def show(rec: dict) -> str:
    """One progress line; a failed defense shows its error."""
    if rec["error"]:
        return f"seed {rec['seed']} {rec['defense']} (defense seed {rec['defense_seed']}): error {rec['error']}"
    return (f"seed {rec['seed']} {rec['defense']} (defense seed {rec['defense_seed']}): ASR {rec['ASR_before']:.1f} -> "
            f"{rec['ASR_after']:.1f}, mIoU-B {rec['mIoU_B_before']:.1f} -> {rec['mIoU_B_after']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--defenses", default=REPAIR)
    ap.add_argument("--defense-seeds", default=None, help="defense seeds per model (default: the model's seed)")
    ap.add_argument("--work", type=Path, default=Path("repair-fixture-work"), help="data and models (built once)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    done, env = start(a)
    for seed in map(int, a.seeds.split(",")):
        run_dir, data = fixture(a.work, seed)
        dseeds = [seed] if a.defense_seeds is None else list(map(int, a.defense_seeds.split(",")))
        with load_pair(run_dir, data, "cpu") as run:
            for name in a.defenses.split(","):
                defense = load_defense(name)
                for ds in dseeds:
                    if (seed, name, getattr(defense, "revision", None), ds) in done:
                        continue
                    rec = record(run, defense, seed, ds, env)
                    with a.out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(show(rec), flush=True)


if __name__ == "__main__":
    main()
