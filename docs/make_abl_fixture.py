"""ABL's isolation on the tests' FGBA N-to-1 line fixture, over isolation epochs and defense seeds (docs/defenses.md,
the abl section): the measurement behind issue 22's "isolated set has precision above the poisoning rate" item.

Usage:
    python docs/make_abl_fixture.py                           # epochs 2, 5, 10 × defense seeds 0-2
    python docs/make_abl_fixture.py --epochs 20 --seeds 0     # the paper's 20 isolation epochs

The fixture is tests/conftest.py's shared one: synthetic scenes 240 train / 48 test at 64×64 (data seed 0), FGBA
N-to-1 (everything → wall) with the line trigger at 10% (poisoning seed 0), deeplabv3_tiny 6 epochs batch 16 fp32
(training seed 0).  ABL runs from scratch at its defaults except ``epochs``; the poison index is read from the
file (the defense never sees it).  Per run one JSON line is appended to --out: the isolated images, how many are
poisoned (precision at the paper's 1%), the AUROC of "low isolation loss = poisoned" over all 240 images, the
median loss of poisoned and clean images, with the CPU, torch version, thread count and git commit.  A run
already in --out is not repeated (a killed run resumes).  One torch thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from make_repair_fixture import start  # this folder's sibling script
from testbed import attacks
from testbed.data.h5data import open_dataset
from testbed.data.synth import make_synth_dataset
from testbed.defenses.abl import ABL
from testbed.evaluation.threat_model import make_context
from testbed.stats.intervals import auroc
from testbed.training.loop import TrainConfig, train
from testbed.training.runs import load_run

OUT = Path(__file__).parent / "results/synthetic/findings/abl-fixture-isolation/results.jsonl"


def fixture(work: Path) -> tuple[torch.nn.Module, Path, np.ndarray]:
    """The shared fixture's model, its poisoned data file and which training images are poisoned (from the file's
    poison index; the defense never sees it), built once under ``work``."""
    synth, data, run_dir = work / "synth.h5", work / "fgba-n1-line.h5", work / "run"
    if not synth.exists():
        make_synth_dataset(synth, n_train=240, n_test=48, size=64, seed=0)
    if not data.exists():
        attacks.poison_file(synth, data, attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.1, seed=0)
    if not (run_dir / "config.json").exists():
        cfg = TrainConfig(model="deeplabv3_tiny", epochs=6, batch_size=16, seed=0, device="cpu", precision="fp32")
        train(data, run_dir, cfg, progress=False)
    with open_dataset(data) as f:
        truth = np.isin(np.arange(f.length("train")), np.asarray(f["train/poison_index"], np.int64))
    return load_run(run_dir)[0], data, truth


def record(model: torch.nn.Module, data: Path, truth: np.ndarray, epochs: int, seed: int, env: dict) -> dict:
    """ABL at ``epochs`` with defense seed ``seed``, in the context the bench runner gives it (make_context)."""
    abl = ABL(epochs=epochs)
    res = abl.run(model, make_context(abl, data, device=torch.device("cpu"), seed=seed))
    losses, isolated = abl.losses_, res.flagged_train
    return {"seed": seed, "defense": f"abl-epochs-{epochs}", "revision": None, "defense_seed": seed, "epochs": epochs,
            "isolated": isolated.tolist(), "isolated_poisoned": int(truth[isolated].sum()),
            "precision": float(truth[isolated].mean()), "poison_rate": float(truth.mean()),
            "auroc_low_loss_poisoned": auroc(truth, -losses), "median_loss_poisoned": float(np.median(losses[truth])),
            "median_loss_clean": float(np.median(losses[~truth])), "seconds": res.cost.seconds, **env}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", default="2,5,10")
    ap.add_argument("--seeds", default="0,1,2", help="defense seeds")
    ap.add_argument("--work", type=Path, default=Path("abl-fixture-work"), help="data and model (built once)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    done, env = start(a)
    model, data, truth = fixture(a.work)
    for epochs in map(int, a.epochs.split(",")):
        for seed in map(int, a.seeds.split(",")):
            if (seed, f"abl-epochs-{epochs}", None, seed) in done:
                continue
            rec = record(model, data, truth, epochs, seed, env)
            with a.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"epochs {epochs} seed {seed}: {rec['isolated_poisoned']} of {len(rec['isolated'])} isolated poisoned "
                  f"(rate {rec['poison_rate']:.2f}), AUROC {rec['auroc_low_loss_poisoned']:.3f}, median loss poisoned "
                  f"{rec['median_loss_poisoned']:.3f} clean {rec['median_loss_clean']:.3f}", flush=True)


if __name__ == "__main__":
    main()
