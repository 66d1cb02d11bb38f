"""Make docs/results.md: the five built-in defenses against every attack of the demo, via `testbed bench`.

Usage: python docs/make_results.py DEMO_OUT [--budget 30] [--out bench-results/]
DEMO_OUT is a finished `testbed demo --out DEMO_OUT` (its work/ holds the poisoned sets and trained runs).
Runs `testbed bench --run RUN --data DATA --defense ALL --budget B --out OUT/NAME` per attacked model and
writes the table to docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from testbed import atomic
from testbed.cli import main as testbed
from testbed.demo import SETTINGS

DEFENSES = "fine-pruning,strip,trigger-synthesis,activation-clustering,spectral-signature"


def _f(x, pct=False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    work = args.demo_out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    commands, rows = [], []
    for s in SETTINGS:
        out = args.out / s.name
        cmd = ["-q", "bench", "--run", str(work / "runs" / s.name), "--data", str(work / "data" / f"{s.name}.h5"),
               "--defense", DEFENSES, "--budget", str(args.budget), "--device", "cpu", "--out", str(out)]
        commands.append("testbed " + " ".join(cmd[1:]))
        if not (out / "results.json").exists():
            print("running", commands[-1], flush=True)
            testbed(cmd)
        rows += [(s, r) for r in json.loads((out / "results.json").read_text())["rows"]]
    settings = json.loads((work / "settings.json").read_text())
    lines = [
        "# Results: five defenses against BadNets and FGBA (synthetic data)",
        "",
        f"Models: the demo's `{settings['model']}` runs ({settings['n_train']} train / {settings['n_test']} test synthetic "
        f"scenes at {settings['size']}², {settings['epochs']} epochs, batch {settings['batch_size']}, seed {settings['seed']}), "
        f"one per attack. Every defense with its default parameters, `--budget {args.budget:g}` seconds, on 2 CPU cores. "
        "Percentages; DER = [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2 (0.5 = no effect). Detection = the input filter's "
        "TPR/FPR/AUROC on the test sets; flagged = training samples a training-set defense removed (precision/recall "
        "against the true poison indices) before the runner retrained with the original arguments.",
        "",
        "| attack | trigger | defense | ASR before → after | mIoU-B before → after | DER | detection TPR/FPR/AUROC | flagged (prec/rec) | verdict | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, r in rows:
        b, a = r.get("before") or {}, r.get("after") or {}
        det, fl, v = r.get("detection"), r.get("flagged"), r.get("verdict")
        dtxt = "/".join(_f(det.get(k), pct=True) for k in ("tpr", "fpr", "auroc")) if det else "–"
        ftxt = f"{fl['count']} ({_f(fl.get('precision'), True)}/{_f(fl.get('recall'), True)})" if fl else "–"
        vtxt = ("backdoored" if v["backdoored"] else "clean") + (
            ": " + ", ".join("→".join(p) for p in v.get("suspected") or []) if v.get("suspected") else "") if v else "–"
        err = f" **error: {r['error']}**" if r.get("error") else ""
        cost = (r.get("cost") or {})
        secs = cost.get("seconds")
        if cost.get("retrain_seconds"):
            secs = f"{secs:.0f} + {cost['retrain_seconds']:.0f} retrain"
        elif secs is not None:
            secs = f"{secs:.0f}"
        lines.append(
            f"| {s.attack} | {s.trigger} | {r['defense']}{err} | {_f(b.get('ASR'))} → {_f(a.get('ASR'))} | "
            f"{_f(b.get('mIoU-B'))} → {_f(a.get('mIoU-B'))} | {'–' if r.get('DER') is None else format(r['DER'], '.3f')} | "
            f"{dtxt} | {ftxt} | {vtxt} | {secs or '–'} |")
    lines += ["", "A defense that fails against an attack is a finding, not a bug. Commands that made this table "
              f"(after `testbed demo --out {args.demo_out}`; `python docs/make_results.py {args.demo_out}` runs them all):",
              "", "```bash"] + commands + ["```", ""]
    atomic.write_text(Path(__file__).with_name("results.md"), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
