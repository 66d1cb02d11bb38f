"""The demo's report: results.json rows checked against the paper's targets, and report.md rendered from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from testbed.demo.settings import (
    ASR_TARGETS, BENIGN_MAX_ASR, COST_ONLY_NOTE, MAX_MIOU_DROP, OPT_IN_NOTE, SETTINGS,
)


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target from the paper's Tables 1–2 with the measured number and whether it was met."""
    benign = next(r for r in rows if r["attack"] == "benign" and r["trigger"] is None)
    out = []
    for r in rows:
        if r["attack"] == "benign":
            if r["trigger"] == "line" and r["ASR"] is not None:
                out.append({"what": f"benign model ASR vs {r['reference']} (line)", "target": f"<= {BENIGN_MAX_ASR:g}",
                            "measured": r["ASR"], "met": r["ASR"] <= BENIGN_MAX_ASR})
            continue
        kind = "line" if r["trigger"] == "line" else "semantic"
        goal = ASR_TARGETS.get((r["attack"], kind))
        if goal is not None:
            out.append({"what": f"{r['attack']} ({r['trigger']}) ASR", "target": f">= {goal:g}",
                        "measured": r["ASR"], "met": r["ASR"] is not None and r["ASR"] >= goal})
            drop = benign["mIoU-B"] - r["mIoU-B"]
            out.append({"what": f"{r['attack']} ({r['trigger']}) mIoU-B drop vs benign", "target": f"<= {MAX_MIOU_DROP:g}",
                        "measured": round(drop, 2), "met": drop <= MAX_MIOU_DROP})
    return out


# -- report.md --------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.1f}"


def _find(rows: list[dict], attack: str, trigger: str | None, reference: str | None = None) -> dict | None:
    for r in rows:
        if r["attack"] == attack and r["trigger"] == trigger and r.get("reference") == reference:
            return r
    return None


def _table(head: Sequence[str], keys: Sequence[str], lines: Sequence[tuple[str, dict | None]]) -> list[str]:
    out = ["| " + " | ".join(["Method", *head]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, r in lines:
        out.append(f"| {label} | " + " | ".join(_fmt(r.get(k) if r else None) for k in keys) + " |")
    return out


B_KEYS = ("mIoU-B", "mIoU-B-all", "PA-B", "PA-B-all")
B_HEAD = ("mIoU-B", "mIoU-B-all", "PA-B", "PA-B-all")
NOTES = [
    "**Which benign score.** mIoU-B/PA-B are scored on the benign test set: all of /test for the line trigger, the "
    "test images *without* the trigger class for a semantic trigger (benign and attacked models on the same "
    "untriggered images: the fair comparison between them). mIoU-B-all/PA-B-all are scored on the whole clean test "
    "set: comparable with the paper's Benign rows, which report one benign score under both trigger types. For the "
    "line trigger the two are equal.",
    "",
    "**Which attack column matches the paper's ASR.** Our ASR counts only attacked pixels whose target differs from "
    "the ground truth. The paper's N-to-1 ASR (which it says equals its mIoU-A and PA-A) and its BadNets ASR (equal to "
    "its PA-A) are all-pixel accuracies against the target: compare them with our **PA-A** column — e.g. the paper's "
    "Benign N-to-1 ASR of ≈15% with our benign model's PA-A, not with its ASR (≈0). For 1-to-1 the paper's ASR is ours.",
]


def _paper_tables(rows: list[dict]) -> list[str]:
    t1 = _table(B_HEAD + ("mIoU-A", "PA-A", "ASR"), B_KEYS + ("mIoU-A", "PA-A", "ASR"), [
        ("Benign, non-semantic (line)", _find(rows, "benign", "line", "badnets")),
        ("BadNets, non-semantic (line)", _find(rows, "badnets", "line")),
        ("Benign, semantic (grass)", _find(rows, "benign", "semantic:grass", "badnets")),
        ("BadNets, semantic (grass)", _find(rows, "badnets", "semantic:grass")),
    ])
    fgba = {}
    for attack, keys in (("fgba-n-to-1", B_KEYS + ("PA-A", "ASR")), ("fgba-1-to-1", B_KEYS + ("mIoU-A", "PA-A", "ASR"))):
        fgba[attack] = _table(keys, keys, [
            ("Benign (vs line)", _find(rows, "benign", "line", attack)),
            ("FGBA (non-semantic)", _find(rows, attack, "line")),
            ("Benign (vs wall)", _find(rows, "benign", "semantic:wall", attack)),
            ("FGBA (semantic)", _find(rows, attack, "semantic:wall")),
        ])
    return (["## Table 1 — BadNets (image-level target: one road-scape label map)", ""] + t1
            + ["", "## Table 2 — FGBA (object-level targets)", "", "N-to-1 (every class → wall):", ""] + fgba["fgba-n-to-1"]
            + ["", "1-to-1 (person → palm):", ""] + fgba["fgba-1-to-1"]
            + ["", "Benign rows: the clean model scored on each attack's test file; each attacked model is scored on the "
               "same images.", ""] + NOTES)


def _rates_table(rows: list[dict]) -> list[str]:
    out = ["## Poisoning rates", "", "| attack | trigger | which training images are poisoned | achieved | paper |",
           "|---|---|---|---|---|"]
    for s in SETTINGS:
        r = _find(rows, s.attack, s.trigger)
        rate = r.get("rate") if r else None
        if s.trigger == "line":
            rule = f"a random {100 * s.flags['rate']:g}% of the candidates"
        else:
            cls = s.trigger.split(":", 1)[1]
            rule = f"every image with {cls}" + (f" and {s.flags['require']}" if s.flags.get("require") else "")
        out.append(f"| {s.attack} | {s.trigger} | {rule} | {'–' if rate is None else f'{100 * rate:.1f}%'} | {s.paper_rate} |")
    return out


def _verdict_text(verdict: dict | None) -> str:
    if not verdict:
        return "–"
    status = verdict.get("status") or ("backdoored" if verdict.get("backdoored") else "clean")
    text = f"{status} ({verdict.get('score') or 0:.2f})"
    if verdict.get("coverage") is not None and status == "inconclusive":
        text += f", covered {100 * verdict['coverage']:.0f}% of the candidates"
    if verdict.get("suspected"):
        text += ": " + ", ".join("→".join(p) for p in verdict["suspected"])
    return text


def _defense_table(defenses: list[dict]) -> list[str]:
    out = ["## Defenses on one attacked model", "",
           "| defense | ASR before | ASR after | mIoU-B before | mIoU-B after | DER | detection (TPR/FPR/AUROC) | verdict | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for d in defenses:
        before, after, det = d.get("before") or {}, d.get("after") or {}, d.get("detection") or {}
        dtxt = "/".join(_fmt(100 * det[k]) if det.get(k) is not None else "–" for k in ("tpr", "fpr", "auroc")) if det else "–"
        der = d.get("DER")
        out.append(f"| {d.get('defense')} | {_fmt(before.get('ASR'))} | {_fmt(after.get('ASR'))} | "
                   f"{_fmt(before.get('mIoU-B'))} | {_fmt(after.get('mIoU-B'))} | {'–' if der is None else f'{der:.3f}'} | "
                   f"{dtxt} | {_verdict_text(d.get('verdict'))} | {_fmt((d.get('cost') or {}).get('seconds'))} |")
    out += ["", "Full defense report, per-input scores and figures: [defenses/report.md](defenses/report.md)."]
    synthesis = next((d for d in defenses if d.get("defense") == "trigger-synthesis"), None)
    if synthesis is None:
        return out + ["", OPT_IN_NOTE]
    partial = ((synthesis.get("details") or {}).get("cost") or {}).get("coverage_of_mode", 1) < 1
    return out + ([""] + cost_table(synthesis) if synthesis.get("details") else []) + (["", COST_ONLY_NOTE] if partial else [])


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.0f} s"


def _measured_text(row: dict, cost: dict, here: dict) -> str:
    """Which candidates were measured, how many steps they took, and the most any candidate can take."""
    steps = (row["details"].get("steps") or {})
    names = ", ".join(f"{k} ({v} steps)" for k, v in steps.items()) or "none"
    return (f"Measured here: {cost.get('candidates_run')} of {cost.get('candidates_in_mode')} image-level candidates "
            f"({names}; a step is one {cost.get('step_unit', 'decision')}), {here['passes_per_candidate']:,.0f} "
            f"forward + backward image passes per candidate, {1000 * here['seconds_per_pass']:.2f} ms per pass on this "
            "machine. Candidates stop by Neural Cleanse's early-stop rule after very different numbers of steps (a "
            "backdoor's target converges early), so the projection from the measured ones can be far off either way; "
            f"every candidate stops by {cost.get('max_steps')} steps, which bounds the cost from above:")


def cost_table(row: dict) -> list[str]:
    """Trigger synthesis's cost analysis (the seed paper's argument): passes per candidate measured on this
    model, projected to every candidate of each search space here and at ADE20K's size (150 classes, 512²),
    beside the most it can cost (every candidate runs all its steps)."""
    cost = row["details"]["cost"]
    here, ade = cost.get("projected") or {}, cost.get("projected_ade20k") or {}
    counts, big = cost.get("counts") or {}, cost.get("ade20k_counts") or {}
    if not here or not cost.get("steps_per_candidate"):
        return []
    most = here["passes_per_candidate"] * cost["max_steps"] / cost["steps_per_candidate"]  # passes of a full run
    lines = ["### Trigger synthesis: what a full search costs", "", _measured_text(row, cost, here), "",
             "| search space | candidates here | passes (as measured) | time here | at most: passes | at most: time "
             "| candidates at ADE20K size | time at ADE20K size (as measured) |", "|---|---|---|---|---|---|---|---|"]
    for key, name in (("image", "every pixel → one class (N-to-1)"), ("pairs", "one class → another (1-to-1)")):
        bound = most * counts.get(key, 0)
        lines.append(f"| {name} | {counts.get(key):,} | {here[key + '_passes']:,.0f} | {_duration(here[key + '_seconds'])} | "
                     f"{bound:,.0f} | {_duration(bound * here['seconds_per_pass'])} | {big.get(key):,} | "
                     f"{_duration(ade[key + '_seconds'])} |")
    lines.append(f"| any class → any class (general FGBA) | 10^{counts.get('log10_matrices', 0):.1f} | — | "
                 f"10^{here.get('log10_matrices_seconds', 0):.1f} s | — | — | 10^{big.get('log10_matrices', 0):.1f} | "
                 f"10^{ade.get('log10_matrices_seconds', 0):.1f} s |")
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_report(results: dict, figures: list[str]) -> str:
    rows, c = results["attacks"], results["config"]
    lines = [
        "# segbackdoor demo", "",
        "**One seed; see docs/results.md for 3-seed intervals.** Same seed and threads ⇒ the same numbers on the "
        "same machine and library versions; other machines (CPU kernels) and thread counts give somewhat different ones.",
        "",
        f"Synthetic scenes ({c['n_train']} train / {c['n_test']} test, {c['size']}×{c['size']}), model `{c['model']}`, "
        f"{c['epochs']} epochs, batch {c['batch_size']}, seed {c['seed']}, device {c['device']}, "
        f"{_plural(c.get('threads', 1), 'thread')} per model and defense; total {results['seconds']:.0f} s with "
        f"{_plural(c.get('workers', 1), 'worker')}. Percentages; metrics as in the paper §3.1 (definitions: "
        "docs/metrics.md).", "",
    ]
    lines += _paper_tables(rows) + [""] + _rates_table(rows)
    lines += ["", "## Targets (from the paper's Tables 1–2)", "", "| what | target | measured | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['what']} | {t['target']} | {_fmt(t['measured'])} | {'yes' if t['met'] else '**no**'} |")
    if results["defenses"]:
        lines += [""] + _defense_table(results["defenses"])
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
