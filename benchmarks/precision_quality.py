"""Does bf16 training give the same models as fp32?  The quality-equivalence table behind ``--precision auto``.

Not a `make bench` benchmark (it needs two built zoos): reads two zoos built from the same spec but for
``[train] precision`` (examples/zoo-bench.toml in fp32, examples/zoo-bench-bf16.toml), pairs their entries by
model, attack and seed, and prints per setting, for benign mIoU-B and the attack success rate (ASR):

- each precision's mean ± half-width of the 95% t-interval over seeds,
- the paired difference (second zoo − first) with its t-interval and the exact sign-flip p,
- whether the two precisions' intervals overlap,

then the same difference pooled over every setting (more pairs, so the test can reject), and the decision by
the rule of the issue that asked for it: bf16 may become ``auto``'s choice only if the intervals overlap for
every setting and metric.  The statistics are :mod:`testbed.stats`' (the bench report's), not re-implemented.

    python benchmarks/precision_quality.py zoo-bench-fp32/ zoo-bench-bf16/

Entries missing from either zoo (a build still running) are left out and counted; a setting with fewer than two
seeds in both has no interval, and then no decision is made.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from testbed.core.errors import UserError
from testbed.stats import LEVEL, md_table, mean_interval, sign_flip_pvalue
from testbed.stats.paired import smallest_p
from testbed.stats.render import difference_text, mean_pm
from testbed.zoo import manifest as mf

METRICS = ("mIoU-B", "ASR")  # percent; ASR is undefined (None) for a benign model
# TrainConfig fields allowed to differ between the two zoos: the arithmetic under test and how it is spelled
PRECISION_FIELDS = ("precision", "amp", "channels_last")


@dataclass
class Zoo:
    """One zoo's finished entries keyed by (model, attack id, seed), and the precision each entry's run used."""

    path: Path
    entries: dict[tuple[str, str, int], dict[str, Any]]
    used: dict[tuple[str, str, int], str]
    planned: int


def load_zoo(path: str | Path) -> Zoo:
    """The finished entries of the zoo at ``path`` (its manifest verified by :func:`manifest.load_manifest`)."""
    path = Path(path)
    manifest = mf.load_manifest(path)
    entries, used = {}, {}
    for row in manifest["entries"]:
        if row["status"] != "done":
            continue
        key = (row["model"], row["attack_id"], int(row["seed"]))
        entries[key] = row
        run_config = mf.read_json(path / row["run_dir"] / "config.json") or {}
        used[key] = (run_config.get("precision") or {}).get("used", "unrecorded")
    return Zoo(path, entries, used, len(manifest["entries"]))


def _settings(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (row.get("config") or {}).items() if k not in PRECISION_FIELDS + ("device",)}


def check_pairable(a: Zoo, b: Zoo) -> list[tuple[str, str, int]]:
    """The keys finished in both zoos; refuses zoos whose paired entries differ in anything but precision."""
    shared = [k for k in a.entries if k in b.entries]  # the first zoo's plan order: settings as the spec lists them
    if not shared:
        raise UserError(f"zoos {a.path} and {b.path} share no finished entry (model, attack, seed); build both from "
                        "the same spec, differing only in [train] precision")
    for key in shared:
        ea, eb = a.entries[key], b.entries[key]
        if _settings(ea) != _settings(eb) or ea.get("attack") != eb.get("attack"):
            diff = sorted(k for k in set(_settings(ea)) | set(_settings(eb)) if _settings(ea).get(k) != _settings(eb).get(k))
            raise UserError(f"entry {ea['id']} differs between {a.path} and {b.path} in more than precision "
                            f"({', '.join(diff) or 'the attack'}); build both zoos from the same spec")
    names = {a.used[k] for k in shared}, {b.used[k] for k in shared}
    if names[0] == names[1] and len(names[0]) == 1:
        raise UserError(f"both zoos trained in {next(iter(names[0]))}; pass an fp32 zoo and a bf16 zoo")
    return shared


def overlap(sa: dict[str, Any], sb: dict[str, Any]) -> bool | None:
    """Whether two t-intervals share a point; None when either has no interval (fewer than two seeds)."""
    if sa["lo"] is None or sb["lo"] is None:
        return None
    return sa["lo"] <= sb["hi"] and sb["lo"] <= sa["hi"]


def paired(va: Sequence[float], vb: Sequence[float], level: float) -> dict[str, Any]:
    """``b − a`` per pair: mean, t-interval and the sign-flip p (exact up to 20 pairs)."""
    diffs = [y - x for x, y in zip(va, vb)]
    p, method = sign_flip_pvalue(diffs)
    return {**mean_interval(diffs, level), "p": p, "test": method}


def _values(zoo: Zoo, keys: Sequence[tuple[str, str, int]], metric: str) -> list[float | None]:
    return [(zoo.entries[k].get("metrics") or {}).get(metric) for k in keys]


def compare_metric(a: Zoo, b: Zoo, keys: Sequence[tuple[str, str, int]], metric: str, level: float) -> dict[str, Any] | None:
    """One row of the table: both precisions' intervals, the paired difference, the overlap; None without values."""
    pairs = [(x, y) for x, y in zip(_values(a, keys, metric), _values(b, keys, metric)) if x is not None and y is not None]
    if not pairs:
        return None
    va, vb = [x for x, _ in pairs], [y for _, y in pairs]
    sa, sb = mean_interval(va, level), mean_interval(vb, level)
    return {"metric": metric, "a": sa, "b": sb, "diff": paired(va, vb, level), "overlap": overlap(sa, sb)}


def compare_zoos(a: Zoo, b: Zoo, level: float = LEVEL) -> dict[str, Any]:
    """Per setting (model, attack) and pooled over all settings: :func:`compare_metric` for each metric."""
    shared = check_pairable(a, b)
    settings = list(dict.fromkeys((m, att) for m, att, _ in shared))
    rows = []
    for model, attack in settings:
        keys = [k for k in shared if k[:2] == (model, attack)]
        for metric in METRICS:
            row = compare_metric(a, b, keys, metric, level)
            if row is not None:
                rows.append({"setting": attack if len({m for m, _ in settings}) == 1 else f"{model} {attack}",
                             "seeds": [k[2] for k in keys], **row})
    pooled = [r for r in (compare_metric(a, b, shared, m, level) for m in METRICS) if r is not None]
    verdicts = [r["overlap"] for r in rows]
    missing = (a.planned - len(shared), b.planned - len(shared))
    decided = bool(verdicts) and None not in verdicts and not any(missing)
    return {"a": a, "b": b, "pairs": len(shared), "rows": rows, "pooled": pooled, "missing": missing,
            "bf16_ok": decided and all(verdicts), "decided": decided}


def _names(result: dict[str, Any]) -> tuple[str, str]:
    return tuple("/".join(sorted(set(z.used.values()))) for z in (result["a"], result["b"]))  # type: ignore[return-value]


def _cells(row: dict[str, Any]) -> list[str]:
    overlap_text = {True: "yes", False: "**no**", None: "no interval"}[row["overlap"]]
    return [row["metric"], mean_pm(row["a"], 2), mean_pm(row["b"], 2), difference_text(row["diff"], row["metric"], " pp"),
            overlap_text]


def decision_text(result: dict[str, Any]) -> str:
    """The rule's answer in one sentence, naming the settings whose intervals do not overlap."""
    apart = [f"{r['setting']} {r['metric']}" for r in result["rows"] if r["overlap"] is False]
    if any(result["missing"]):
        so_far = f"; so far the intervals do not overlap for {', '.join(apart)}" if apart else ""
        return (f"no decision: {max(result['missing'])} planned entries are not finished in both zoos (finish both "
                f"builds; every setting counts){so_far}")
    if not result["decided"]:
        return "no decision: some setting has fewer than two seeds (no interval); `--precision auto` stays fp32"
    if result["bf16_ok"]:
        return "every interval overlaps: bf16 may be `--precision auto`'s choice on a CPU with native bf16"
    return f"intervals do not overlap for {', '.join(apart)}: `--precision auto` stays fp32"


def render(result: dict[str, Any]) -> str:
    """The table (markdown), the pooled differences and the decision."""
    na, nb = _names(result)
    head = ["setting", "metric", f"{na} mean ± 95% CI [seeds]", f"{nb} mean ± 95% CI [seeds]",
            f"{nb} − {na} (paired over seeds)", "intervals overlap"]
    body = [[r["setting"], *_cells(r)] for r in result["rows"]]
    body += [["all settings pooled", *_cells(r)] for r in result["pooled"]]
    n_seeds = max((len(r["seeds"]) for r in result["rows"]), default=0)
    lines = [f"zoos: {result['a'].path} ({na}) and {result['b'].path} ({nb}); {result['pairs']} paired entries"
             + (f", not finished in both: {result['missing'][0]} / {result['missing'][1]}" if any(result["missing"]) else ""),
             "", md_table(head, body), "",
             f"With {n_seeds} seeds the sign-flip p of one setting cannot go below {smallest_p(n_seeds):.2g}; "
             "the pooled rows pair every entry.", "", f"decision: {decision_text(result)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fp32 vs bf16 quality equivalence of two zoos built from one spec.")
    ap.add_argument("zoo_a", help="the reference zoo (fp32)")
    ap.add_argument("zoo_b", help="the zoo under test (bf16); differences are zoo_b - zoo_a")
    ap.add_argument("--level", type=float, default=LEVEL, help=f"interval level (default {LEVEL})")
    args = ap.parse_args(argv)
    try:
        if not 0 < args.level < 1:
            raise UserError(f"--level must be between 0 and 1, got {args.level}")
        text = render(compare_zoos(load_zoo(args.zoo_a), load_zoo(args.zoo_b), args.level))
    except UserError as e:
        print(f"precision_quality: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
