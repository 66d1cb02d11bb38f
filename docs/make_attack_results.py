"""Measure attack suite II: IBA (baseline/NNI/PRL), object-bound, FGBA N-to-1 with the blended and warp triggers.

Usage: python docs/make_attack_results.py [ZOO/] [--budget-passes N] [--bench BENCH/] [--no-bench] [--spec SPEC]

1. `testbed zoo build examples/zoo-attacks.toml --out ZOO/` (the demo's data and model, one seed; rerunning
   resumes and skips what is done);
2. prints Markdown tables from each entry's metrics.json: ASR, mIoU-B and its drop against the benign model,
   PBA, the trigger's PSNR/SSIM (`testbed data info`), IBA's ASR per trigger–victim distance bin (also for the
   benign model on the same attacked images), object-bound's false-flip rate;
3. draws docs/img/iba-asr-distance.png (ASR against distance, one line per variant);
4. unless --no-bench: `testbed bench --zoo ZOO/ --defense DEFENSES [--budget-passes N] --out BENCH/` and the defenses
   table (a pass budget, not a wall-clock one: the same stopping point under any load); DEFENSES are the seven the synthetic
   reference benchmark runs on every model, as docs/results/attacks/bench/ was made.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from testbed.cli import main as testbed

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "examples" / "zoo-attacks.toml"
FIGURE = HERE / "img" / "iba-asr-distance.png"
DEFENSES = "fine-pruning,strip,scale-up,clp,ft,nad,i-bau"  # docs/make_results.py's DEFENSES_7


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _entries(zoo_dir: Path) -> tuple[dict, dict]:
    """(attack id → (entry, full metrics), benign entry's full reference scores by attack id)."""
    import testbed.zoo

    zoo = testbed.zoo.open(zoo_dir)
    out, reference = {}, {}
    for e in zoo:
        metrics = json.loads((e.run_dir / "metrics.json").read_text())
        out[e.attack_id] = (e, metrics)
        ref = e.run_dir / "reference.json"
        if e.is_benign and ref.exists():
            reference = json.loads(ref.read_text())
    return out, reference


def attack_table(rows: dict, reference: dict) -> list[str]:
    from testbed.commands.data import dataset_info

    benign = rows["benign"][1]
    lines = ["| attack | trigger | ASR | benign model's ASR | mIoU-B | ΔmIoU-B vs benign | PBA | trigger PSNR dB / SSIM | "
             "false-flip rate |", "|---|---|---|---|---|---|---|---|---|"]
    for aid, (e, m) in rows.items():
        if e.is_benign:
            continue
        info = dataset_info(e.data_path, stats=False, show_progress=False)
        fid = (info.get("poison") or {}).get("trigger_fidelity") or {}
        trig = (info.get("attack") or {}).get("trigger", {}).get("spec", "?")
        ff = m.get("false-flip")
        fftxt = f"{_f(ff['rate'])} ({ff['flipped']}/{ff['pixels']} px)" if ff else "–"
        lines.append(f"| {aid} | {trig} | {_f(m['ASR'])} | {_f((reference.get(aid) or {}).get('ASR'))} | {_f(m['mIoU-B'])} "
                     f"| {_f(benign['mIoU-B'] - m['mIoU-B'])} | {_f(m['PBA'])} | {_f(fid.get('psnr_db'))} / "
                     f"{_f(fid.get('ssim'), 3)} | {fftxt} |")
    return lines


def distance_table(rows: dict, reference: dict) -> tuple[list[str], dict]:
    """IBA's ASR per distance bin; also returns {label: [(bin, ASR), ...]} for the figure."""
    iba = {aid: m for aid, (e, m) in rows.items() if m.get("ASR-by-distance")}
    if not iba:
        return [], {}
    bins = [r["bin"] for r in next(iter(iba.values()))["ASR-by-distance"]]
    lines = ["| model | " + " | ".join(f"ASR {b} px" for b in bins) + " |", "|---|" + "---|" * len(bins)]
    series = {}
    for aid, m in iba.items():
        by = m["ASR-by-distance"]
        lines.append(f"| {aid} | " + " | ".join(f"{_f(r['ASR'])} ({r['images']} img)" for r in by) + " |")
        series[aid] = [(r["bin"], r["ASR"]) for r in by]
    for aid in iba:
        by = (reference.get(aid) or {}).get("ASR-by-distance")
        if by:
            lines.append(f"| benign model on {aid}'s images | " + " | ".join(_f(r["ASR"]) for r in by) + " |")
            series.setdefault("benign model", [(r["bin"], r["ASR"]) for r in by])
    return lines, series


def draw_figure(series: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from testbed.core.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for label, pts in series.items():
        xs = [b for b, v in pts if v is not None]
        ys = [v for b, v in pts if v is not None]
        ax.plot(xs, ys, marker="o", linestyle="--" if label == "benign model" else "-", label=label)
    ax.set_xlabel("patch centre to nearest victim pixel (chessboard px)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("IBA: ASR by trigger–victim distance (synthetic scenes, one seed)", fontsize=9)
    ax.legend(fontsize=8)
    with atomic_file(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def defense_table(bench: Path) -> list[str]:
    rows = json.loads((bench / "results.json").read_text())["rows"]
    lines = ["| model | defense | ASR before → after | mIoU-B before → after | DER | detection TPR/FPR | "
             "flagged (prec/rec) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, det, fl, v = r.get("before") or {}, r.get("after") or {}, r.get("detection"), r.get("flagged"), r.get("verdict")
        dtxt = f"{_f(100 * det['tpr'])}/{_f(100 * det['fpr'])}" if det and det.get("tpr") is not None else "–"
        ftxt = f"{fl['count']} ({_f(100 * fl['precision']) if fl.get('precision') is not None else '–'}/" \
               f"{_f(100 * fl['recall']) if fl.get('recall') is not None else '–'})" if fl else "–"
        vtxt = ("backdoored" if v.get("backdoored") else "clean") if v else "–"
        err = f" (error: {r['error']})" if r.get("error") else ""
        lines.append(f"| {r.get('model', '?')} | {r['defense']}{err} | {_f(b.get('ASR'))} → {_f(a.get('ASR'))} | "
                     f"{_f(b.get('mIoU-B'))} → {_f(a.get('mIoU-B'))} | {_f(r.get('DER'), 3)} | {dtxt} | {ftxt} | {vtxt} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", type=Path, nargs="?", default=Path("zoo-attacks"))
    ap.add_argument("--budget-passes", type=int, default=None, help="compute budget per defense run (default: none)")
    ap.add_argument("--bench", type=Path, default=Path("bench-attacks"))
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--spec", type=Path, default=SPEC, help="another zoo spec (default examples/zoo-attacks.toml)")
    ap.add_argument("--figure", type=Path, default=FIGURE)
    args = ap.parse_args(argv)
    rc = testbed(["zoo", "build", str(args.spec), "--out", str(args.zoo), "--device", "cpu", "--workers", "auto"])
    if rc != 0:
        return rc
    rows, reference = _entries(args.zoo)
    e = rows["benign"][0]
    t, d = e.config["train"], e.config["dataset"]
    out = [f"## Attack suite II ({d['num_train']} synthetic training images, model {t['model']}, {t['epochs']} epochs, "
           f"batch {t['batch_size']}, seed {e.seed}, device {e.config['device']}; one seed)", ""]
    out += attack_table(rows, reference)
    dist, series = distance_table(rows, reference)
    if dist:
        out += ["", "IBA: ASR per trigger–victim distance bin (chessboard px from the patch centre to the car)", ""] + dist
        draw_figure(series, args.figure)
    if not args.no_bench:
        if not (args.bench / "results.json").exists():
            budget = ["--budget-passes", str(args.budget_passes)] if args.budget_passes else []
            rc = testbed(["-q", "bench", "--zoo", str(args.zoo), "--defense", DEFENSES, *budget, "--device", "cpu",
                          "--out", str(args.bench)])
            if rc != 0:
                return rc
        budget = f" --budget-passes {args.budget_passes}" if args.budget_passes else ""
        ran = ",".join(json.loads((args.bench / "results.json").read_text())["meta"]["defenses"])
        out += ["", f"Defenses (`testbed bench --zoo {args.zoo} --defense {ran}{budget}`; one seed; DER is n/a where the "
                "attack did not implant, ASR before < 50%)", ""]
        out += defense_table(args.bench)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
