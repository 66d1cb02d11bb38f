"""How many training images activation clustering and spectral signatures remove, per image-flagging rule.

Run: `.venv/bin/python benchmarks/flagging_rules.py [--run RUN/ --data POISONED.h5] [--threads 1]`.
Without ``--run``/``--data`` it builds the unit tests' recipe in a temporary folder (synthetic scenes, 240
train images at 64², FGBA N-to-1 → wall with the line trigger at 10%, ``deeplabv3_tiny`` 6 epochs, seed 0).
For each defense and rule (``area``, the default, and ``any``) it prints the images removed, the fraction
removed next to the defense's nominal fraction, and precision/recall against the poison indices (read here
for scoring only; the defenses never see them).  Not a P-line benchmark: a measurement behind docs/defenses.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def build(work: Path) -> tuple[Path, Path]:
    """The tests' recipe (tests/conftest.py): clean synthetic data, FGBA N-to-1 line 10%, a tiny trained model."""
    from testbed import attacks
    from testbed.data.synth import make_synth_dataset
    from testbed.training.loop import TrainConfig, train

    clean = make_synth_dataset(work / "synth.h5", n_train=240, n_test=48, size=64, seed=0)
    data = attacks.poison_file(clean, work / "fgba.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                               rate=0.1, seed=0)
    run = train(data, work / "run", TrainConfig(model="deeplabv3_tiny", epochs=6, batch_size=16, seed=0, device="cpu"),
                progress=False)
    return Path(run), Path(data)


def measure(run: Path, data: Path) -> list[dict]:
    from testbed import defenses
    from testbed.evaluation.threat_model import make_context
    from testbed.data.h5data import open_dataset
    from testbed.training.runs import load_run

    with open_dataset(data) as f:
        poison = np.asarray(f["train/poison_index"], np.int64)
    rows = []
    for name in ("spectral-signature", "activation-clustering"):
        for rule in ("area", "any"):
            defense = defenses.BUILTIN[name](rule=rule)
            model, _ = load_run(run, torch.device("cpu"))
            res = defense.run(model, make_context(defense, data, device=torch.device("cpu"), seed=0))
            fl, d = res.flagged_train, res.details
            rows.append({"defense": name, "rule": rule, "removed": len(fl), "n": d["train_size"],
                         "fraction": d["removed_fraction"], "nominal": d["nominal_fraction"],
                         "precision": float(np.isin(fl, poison).mean()) if len(fl) else float("nan"),
                         "recall": float(np.isin(poison, fl).mean()) if len(poison) else float("nan"),
                         "judged": [c for c, v in d["per_class"].items() if v.get("judged_poisoned")]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a trained run folder (default: build the tests' recipe)")
    ap.add_argument("--data", type=Path, help="the poisoned dataset the run was trained on")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if (args.run is None) != (args.data is None):
        ap.error("give both --run and --data, or neither")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run, data = (args.run, args.data) if args.run else build(Path(tmp))
        rows = measure(run, data)
    print("defense               rule  removed      fraction  nominal  removed/nominal  precision  recall")
    for r in rows:
        print(f"{r['defense']:<21} {r['rule']:<5} {r['removed']:>4}/{r['n']:<5}  {r['fraction']:>8.3f}  {r['nominal']:>7.3f}"
              f"  {r['fraction'] / r['nominal'] if r['nominal'] else float('nan'):>15.2f}  {r['precision']:>9.2f}  {r['recall']:>6.2f}")
    for r in rows:
        if r["defense"] == "activation-clustering" and r["rule"] == "area":
            print(f"activation clustering judged {len(r['judged'])} classes poisoned: {', '.join(r['judged'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
