"""Make docs/results.md: the built-in defenses against the demo's attacks over seeds, from `testbed bench`.

Usage:
    testbed zoo build examples/zoo-bench.toml --out zoo-bench/ --workers auto
    testbed bench --zoo zoo-bench/ --defense fine-pruning,strip,trigger-synthesis,activation-clustering,spectral-signature \\
        --workers 2 --threads 1 --out bench-ref/
    testbed bench --zoo zoo-bench/ --defense fine-pruning --param ranking=max --workers 2 --threads 1 --out bench-fp-max/
    testbed zoo build examples/zoo-arch.toml --out zoo-arch/ --workers auto
    testbed bench --zoo zoo-arch/ --defense fine-pruning,strip,trigger-synthesis --workers 2 --threads 1 --out bench-arch/
    python docs/make_results.py bench-ref/ [--fp-max bench-fp-max/] [--arch bench-arch/] [--out docs/results.md]

Every table is computed here from the reports' results.json with testbed.stats (the same code as the report):
mean ± half-width of the 95% t-interval over seeds [n], verdict rates with Wilson intervals, paired differences
with an exact sign-flip test.  Text after the line ``<!-- notes -->`` in the existing --out file (the written
reading of the numbers) is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from testbed.core import atomic
from testbed.stats import mean_interval, read_report
from testbed.stats.render import mean_pm, md_table
from testbed.stats.intervals import sign_flip_pvalue
from testbed.stats.render import comparisons_markdown, detection_markdown

NOTES = "<!-- notes -->"
SETTINGS = ("benign", "badnets-line", "badnets-semantic", "fgba-n-to-1-line", "fgba-n-to-1-semantic",
            "fgba-1-to-1-line", "fgba-1-to-1-semantic")


def machine() -> str:
    """This machine in words (the one the commands ran on: run this script where you ran them)."""
    import os

    import torch

    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {cpu}, Python {platform.python_version()}, torch {torch.__version__}"


def _setting(row: dict[str, Any]) -> str:
    return str((row.get("group") or {}).get("attack") or row["model"].split("--")[1])


def _by(rows: list[dict[str, Any]], defense: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["defense"] == defense and not r.get("error"):
            out.setdefault(_setting(r), []).append(r)
    return out


def _stat(rows: list[dict[str, Any]], get) -> dict[str, Any]:
    vals = []
    for r in rows:
        try:
            v = get(r)
        except (KeyError, TypeError):
            v = None
        vals.append(None if v is None else float(v))
    return mean_interval(vals)


def _cell(rows, get, nd: int = 1) -> str:
    return mean_pm(_stat(rows, get), nd)


def attack_table(rows: list[dict[str, Any]], defense: str) -> str:
    """Each setting before any defense (read from one defense's rows: "before" is the same model and test set)."""
    body = []
    for s, rs in _by(rows, defense).items():
        body.append([s, len(rs), _cell(rs, lambda r: r["before"]["ASR"]), _cell(rs, lambda r: r["before"]["mIoU-B"]),
                     _cell(rs, lambda r: r["before"]["PA-A"])])
    return md_table(["setting", "seeds", "ASR", "mIoU-B", "PA-A"], body)


def defense_table(rows: list[dict[str, Any]], defense: str) -> str:
    """One defense: every setting, after-scores and DER; filters add detection; retrains add the random control."""
    groups = _by(rows, defense)
    any_row = next((r for rs in groups.values() for r in rs), {})
    kinds = set(any_row.get("kinds") or [])
    header = ["setting", "n", "ASR after", "mIoU-B after", "DER"]
    if "filter" in kinds:
        header += ["TPR", "FPR", "AUROC"]
    if "retrain" in kinds:
        header += ["removed (fraction)", "precision", "recall", "random removal: ASR", "random: mIoU-B", "random: DER"]
    if "verdict" in kinds:
        header += ["said backdoored", "inconclusive"]
    header += ["passes (fwd+bwd)", "seconds"]
    body = []
    for s, rs in groups.items():
        line = [s, len(rs), _cell(rs, lambda r: r["after"]["ASR"]), _cell(rs, lambda r: r["after"]["mIoU-B"]),
                _cell(rs, lambda r: r["DER"], 3)]
        if "filter" in kinds:
            line += [_cell(rs, lambda r: r["detection"]["tpr"], 3), _cell(rs, lambda r: r["detection"]["fpr"], 3),
                     _cell(rs, lambda r: r["detection"]["auroc"], 3)
                     + (" ²" if any((r.get("detection") or {}).get("confounded") for r in rs) else "")]
        if "retrain" in kinds:
            line += [_cell(rs, lambda r: r["flagged"]["fraction"], 3), _cell(rs, lambda r: r["flagged"]["precision"], 3),
                     _cell(rs, lambda r: r["flagged"]["recall"], 3), _cell(rs, lambda r: r["after_random"]["ASR"]),
                     _cell(rs, lambda r: r["after_random"]["mIoU-B"]), _cell(rs, lambda r: r["DER_random"], 3)]
        if "verdict" in kinds:
            status = [(r.get("verdict") or {}).get("status") for r in rs]
            line += [f"{status.count('backdoored')}/{len(rs)}", f"{status.count('inconclusive')}/{len(rs)}"]
        passes = _stat(rs, lambda r: (r["cost"]["forward_passes"] or 0) + (r["cost"]["backward_passes"] or 0))
        line += ["—" if passes["mean"] is None else f"{passes['mean']:,.0f}",
                 _cell(rs, lambda r: r["cost"]["seconds"] + (r["cost"].get("retrain_seconds") or 0), 0)]
        body.append(line)
    return md_table(header, body)


def ranking_ablation(mean_rows: list[dict[str, Any]], max_rows: list[dict[str, Any]]) -> str:
    """Fine-pruning ranked by mean vs max activation, paired on the same models: per setting and overall."""
    a = {r["model"]: r for r in mean_rows if r["defense"] == "fine-pruning" and not r.get("error")}
    b = {r["model"]: r for r in max_rows if r["defense"] == "fine-pruning" and not r.get("error")}
    shared = [m for m in a if m in b]
    body = []
    for setting in [*dict.fromkeys(_setting(a[m]) for m in shared), "all"]:
        ms = [m for m in shared if setting == "all" or _setting(a[m]) == setting]
        line = [setting, len(ms)]
        for key in ("ASR", "mIoU-B"):
            line += [_cell([a[m] for m in ms], lambda r: r["after"][key]), _cell([b[m] for m in ms], lambda r: r["after"][key])]
        diffs = [a[m]["DER"] - b[m]["DER"] for m in ms if a[m]["DER"] is not None and b[m]["DER"] is not None]
        p, _ = sign_flip_pvalue(diffs)
        line += [mean_pm(mean_interval(diffs), 3), "—" if p is None else f"{p:.3g}"]
        body.append(line)
    return md_table(["setting", "models", "ASR after (mean)", "ASR after (max)", "mIoU-B after (mean)",
                     "mIoU-B after (max)", "DER mean − max", "p (sign-flip)"], body)


def zoo_settings(meta: dict[str, Any]) -> str:
    """The data and training of the report's zoo, read from its entries (not assumed)."""
    import testbed.zoo

    try:
        e = next(iter(testbed.zoo.open(meta["zoo"])))
    except Exception as exc:  # the zoo moved or is gone: say so rather than guess
        return f"(zoo {meta.get('zoo')!r} not readable here: {exc})"
    t, d = e.config["train"], e.config["dataset"]
    return f"`{t['model']}`, {d.get('num_train')} training images, {t['epochs']} epochs, batch {t['batch_size']}"


def _family(row: dict[str, Any]) -> str:
    return row["model"].split("--")[0]


def architecture_table(ref_rows: list[dict[str, Any]], arch_rows: list[dict[str, Any]]) -> str:
    """Each setting of the architecture zoo, per family (the reference zoo's CNN beside it), and their paired
    difference by seed (same poisoned training set per seed): ASR and mIoU-B before, each defense's DER."""
    settings = list(dict.fromkeys(_setting(r) for r in arch_rows))
    defenses = list(dict.fromkeys(r["defense"] for r in arch_rows))
    pool = [r for r in ref_rows if _setting(r) in settings and r["defense"] in defenses and not r.get("error")]
    pool += [r for r in arch_rows if not r.get("error")]
    families = list(dict.fromkeys(_family(r) for r in pool))
    metrics = [("ASR", lambda r: r["before"]["ASR"], 1), ("mIoU-B", lambda r: r["before"]["mIoU-B"], 1)]
    verdicts = [d for d in defenses if any(r["defense"] == d and r.get("verdict") for r in pool)]
    metrics += [(f"DER {d}", (lambda d: lambda r: r["DER"] if r["defense"] == d else None)(d), 3)
                for d in defenses if d not in verdicts]
    defenses = [d for d in defenses if d not in verdicts] + verdicts
    body = []
    for s in settings:
        for fam in families:
            rs = [r for r in pool if _setting(r) == s and _family(r) == fam]
            first = [r for r in rs if r["defense"] == defenses[0]]
            said = [[(r.get("verdict") or {}).get("status") for r in rs if r["defense"] == d] for d in verdicts]
            body.append([s, fam, len(first)] + [_cell(first if not name.startswith("DER") else rs, get, nd)
                                                 for name, get, nd in metrics]
                        + [f"{v.count('backdoored')}/{len(v)}" for v in said])
        if len(families) == 2:
            line = [s, f"{families[1]} − {families[0]}", ""]
            for name, get, nd in metrics:
                by = {fam: {(r["model"].rsplit("--s", 1)[-1], r["defense"]): get(r) for r in pool
                            if _setting(r) == s and _family(r) == fam} for fam in families}
                keys = [k for k in by[families[1]] if k in by[families[0]] and (name.startswith("DER") or k[1] == defenses[0])]
                diffs = [by[families[1]][k] - by[families[0]][k] for k in keys
                         if by[families[1]][k] is not None and by[families[0]][k] is not None]
                line.append(mean_pm(mean_interval(diffs), nd))
            body.append(line + ["" for _ in verdicts])
    return md_table(["setting", "model", "seeds", *[m[0] for m in metrics], *[f"{d}: said backdoored" for d in verdicts]],
                    body)


def document(report: dict[str, Any], fp_max: dict[str, Any] | None, sources: list[str],
             arch: dict[str, Any] | None = None) -> list[str]:
    rows = report["rows"]
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    meta = report.get("meta") or {}
    seeds = sorted({int(r["model"].rsplit("--s", 1)[-1]) for r in rows})
    settings = list(dict.fromkeys(_setting(r) for r in rows))
    errors = [r for r in rows if r.get("error")]
    out = [f"# Results: the built-in defenses against BadNets and FGBA over {len(seeds)} seeds (synthetic data)", "",
           "Produced by `python docs/make_results.py` from these reports (the commands are in its docstring): "
           + ", ".join(f"`{s}`" for s in sources) + ".",
           f"Models: zoo `{meta.get('zoo')}` — {zoo_settings(meta)}; settings {', '.join(settings)} × seeds "
           f"{', '.join(map(str, seeds))} = {len({r['model'] for r in rows})} models. Every defense with its default "
           f"parameters, no time budget, {meta.get('threads')} torch thread(s) per model × defense pair, device "
           f"{meta.get('device')}. Generated on: {machine()} (run it on the machine that ran the benchmark).",
           f"Failed runs: {len(errors)}" + ("" if not errors else " — " + "; ".join(
               f"{r['model']} × {r['defense']}: {r['error']}" for r in errors)) + " (a failed run is left out of its "
           "cells: n counts the seeds that ran).",
           "",
           "Cells: mean ± half-width of the 95% t-interval over the seeds [number of seeds]; percentages for ASR and "
           "mIoU-B, fractions for the rest. DER = [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2 (0.5 = no effect, 1 = "
           "backdoor removed at no cost). Exact numbers differ on other machines and thread counts; the intervals "
           "say how much they move with the seed. Definitions: docs/metrics.md.", "",
           "## The attacked models before any defense", "", attack_table(rows, defenses[0]), ""]
    for d in defenses:
        out += [f"## {d}", "", defense_table(rows, d), ""]
    if any("retrain" in (r.get("kinds") or []) for r in rows):
        out += ["Training-set defenses: the runner removes the flagged training images and retrains with the model's own "
                "training settings; *random removal* retrains once more after removing a random subset of the same size "
                "(same seed discipline): the control that separates removing the poison from losing data.", ""]
    if any((r.get("detection") or {}).get("confounded") for r in rows):
        out += ["² Confounded: with a semantic trigger the attacked test images are picked by content (they contain the "
                "trigger class), so TPR/FPR/AUROC compare different images, not the same images with and without a "
                "trigger; a filter may separate the two sets by their content. Read these detection figures as an upper "
                "bound on what the filter does against the trigger.", ""]
    stats_md = detection_markdown(report.get("detection") or [])
    if stats_md:
        out += [stats_md, ""]
    comp = comparisons_markdown(report.get("comparisons") or [])
    if comp:
        out += [comp, ""]
    if fp_max is not None:
        out += ["## Fine-pruning: rank channels by mean or by max activation", "",
                "The same models, fine-pruning with `ranking=mean` (our default: Liu et al. prune the channels with the "
                "lowest mean activation on clean data) and `ranking=max` (the largest activation over the image, as "
                "BackdoorBench ranks them); paired by model.", "", ranking_ablation(rows, fp_max["rows"]), ""]
    if arch is not None:
        out += ["## Across architectures: tiny CNN vs tiny SegFormer", "",
                "The segformer_tiny models of `examples/zoo-arch.toml` beside the reference zoo's deeplabv3_tiny models "
                "with the same attack ids (same data, poisoned sets, training settings and seeds); the difference rows "
                "pair the two families by seed (same poisoned training set).", "",
                architecture_table(rows, arch["rows"]), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="the reference benchmark's report directory")
    ap.add_argument("--fp-max", type=Path, help="a report of fine-pruning with --param ranking=max on the same zoo")
    ap.add_argument("--arch", type=Path, help="a report of the same defenses on the examples/zoo-arch.toml zoo")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.md")
    args = ap.parse_args(argv)
    report = read_report(args.bench / "results.json")
    fp_max = read_report(args.fp_max / "results.json") if args.fp_max else None
    arch = read_report(args.arch / "results.json") if args.arch else None
    sources = [str(p) for p in (args.bench, args.fp_max, args.arch) if p]
    lines = document(report, fp_max, sources, arch)
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else NOTES + "\n"
    atomic.write_text(args.out, "\n".join(lines) + "\n" + notes)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
