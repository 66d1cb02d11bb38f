"""testbed.stats: every interval and test recomputed independently (scipy, sklearn, numpy, hand-worked)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from testbed.core.errors import UserError
from testbed.stats import (aggregate, aggregate_csv, aggregate_markdown, auroc, auroc_interval, bench_statistics,
                           compare, compare_all, comparison_lines, detection_summary, mean_interval, parse_entry_id,
                           sign_flip_pvalue, statistics_markdown, true_targets, wilson_interval)
from testbed.stats import intervals

# -- synthetic bench rows ---------------------------------------------------------------------------

MODELS = ("deeplabv3_tiny", "fcn_tiny")
ATTACKS = ("fgba-n1-line", "badnets-line-r0.05", "fgba-11-tsemantic_wall")


def make_row(model: str, defense: str, before: dict, after: dict | None, *, error: str | None = None, **extra) -> dict:
    der = None
    if after is not None and before.get("ASR") is not None and after.get("ASR") is not None:
        der = (max(0.0, (before["ASR"] - after["ASR"]) / 100) - max(0.0, (before["mIoU-B"] - after["mIoU-B"]) / 100) + 1) / 2
    return {"model": model, "attack": model.split("--")[1] if "--" in model else "x", "defense": defense,
            "benign_model": False, "before": before, "after": None if error else after, "DER": None if error else der,
            "detection": None, "flagged": None, "verdict": None, "cost": {"seconds": 0.0}, "error": error, **extra}


def zoo_rows(seed: int = 0) -> list[dict]:
    """2 models × 3 attacks × seeds 0-2 × 3 defenses, with the awkward cases: an error row, a null ASR, a group
    with one seed, rows with and without "group"/"seed" keys, filter and flagging figures."""
    rng = np.random.default_rng(seed)
    rows = []
    for m, a in itertools.product(MODELS, ATTACKS):
        seeds = [0] if (m, a) == ("fcn_tiny", "fgba-11-tsemantic_wall") else [0, 1, 2]
        for s in seeds:
            eid = f"{m}--{a}--s{s}"
            before = {"ASR": float(rng.uniform(60, 100)), "mIoU-B": float(rng.uniform(40, 80))}
            extra = {"group": {"model": m, "attack": a}, "seed": s} if m == "fcn_tiny" else {}
            for d in ("fine-pruning", "strip", "spectral-signature"):
                after = {"ASR": float(rng.uniform(0, 100)), "mIoU-B": float(before["mIoU-B"] - rng.uniform(0, 10))}
                if (m, a, s, d) == ("deeplabv3_tiny", "fgba-n1-line", 1, "strip"):
                    after["ASR"] = None  # a null metric: out of ASR_after's n only
                err = "RuntimeError: boom" if (m, a, s, d) == ("deeplabv3_tiny", "badnets-line-r0.05", 2, "fine-pruning") else None
                row = make_row(eid, d, before, after, error=err, **extra)
                if d == "strip" and not err:
                    row["detection"] = {"tpr": float(rng.uniform()), "fpr": float(rng.uniform()), "auroc": float(rng.uniform())}
                if d == "spectral-signature":
                    row["flagged"] = {"count": 5, "precision": float(rng.uniform()), "recall": float(rng.uniform()),
                                      "fraction": float(rng.uniform(0, 0.2))}
                rows.append(row)
    return rows


def recompute_aggregate(rows: list[dict]) -> dict:
    """A second implementation: group by the id's first two fields, read values by hand, numpy + scipy."""
    getters = {
        "DER": lambda r: r["DER"], "ASR_before": lambda r: r["before"]["ASR"], "ASR_after": lambda r: (r["after"] or {}).get("ASR"),
        "mIoU-B_before": lambda r: r["before"]["mIoU-B"], "mIoU-B_after": lambda r: (r["after"] or {}).get("mIoU-B"),
        "tpr": lambda r: (r["detection"] or {}).get("tpr"), "fpr": lambda r: (r["detection"] or {}).get("fpr"),
        "auroc": lambda r: (r["detection"] or {}).get("auroc"), "precision": lambda r: (r["flagged"] or {}).get("precision"),
        "recall": lambda r: (r["flagged"] or {}).get("recall"), "fraction": lambda r: (r["flagged"] or {}).get("fraction"),
    }
    out: dict = {}
    for r in rows:
        model, attack, _ = r["model"].split("--")
        out.setdefault((model, attack, r["defense"]), []).append(r)
    expected = {}
    for key, members in out.items():
        good = [r for r in members if r["error"] is None]
        per = {}
        for name, get in getters.items():
            x = np.array([get(r) for r in good if get(r) is not None], dtype=float)
            if x.size >= 2:
                lo, hi = sps.t.interval(0.95, x.size - 1, loc=x.mean(), scale=sps.sem(x))
                per[name] = (x.size, x.mean(), np.std(x, ddof=1), lo, hi)
            elif x.size == 1:
                per[name] = (1, x[0], None, None, None)
        expected[key] = (len(good), len(members) - len(good), per)
    return expected


# -- intervals --------------------------------------------------------------------------------------

def test_t_interval_hand_worked():
    # mean 2, s = 1; t(0.975, df=2) = 4.303 (table), half-width = 4.303 / sqrt(3) = 2.484
    s = mean_interval([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx(1.0, abs=1e-15)
    assert s["lo"] == pytest.approx(2 - 2.4842, abs=1e-3) and s["hi"] == pytest.approx(2 + 2.4842, abs=1e-3)
    # n = 2: s = sqrt(2), sem = 1, t(0.975, df=1) = 12.706
    s = mean_interval([10.0, 12.0])
    assert (s["lo"], s["hi"]) == (pytest.approx(11 - 12.706, abs=1e-3), pytest.approx(11 + 12.706, abs=1e-3))


def test_t_interval_against_scipy():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 18):
        x = rng.normal(50, 10, n)
        s = mean_interval(list(x))
        lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=sps.sem(x))
        assert s["std"] == pytest.approx(np.std(x, ddof=1), abs=1e-12)
        assert (s["lo"], s["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))


def test_one_value_has_no_interval_and_nulls_are_not_zeros():
    assert mean_interval([7.5]) == {"n": 1, "mean": 7.5, "std": None, "lo": None, "hi": None}
    assert mean_interval([None, float("nan")]) == {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    assert mean_interval([1.0, None, 3.0, float("nan")])["mean"] == 2.0


def test_wilson_hand_worked_and_against_scipy():
    lo, hi = wilson_interval(5, 10)  # textbook: 5/10 -> [0.2366, 0.7634]
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    for k, n in [(0, 3), (3, 3), (1, 3), (7, 18), (18, 18), (0, 1)]:
        ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert wilson_interval(0, 0) == (None, None)


def test_sign_flip_hand_worked():
    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == (0.25, "exact")  # |±1±2±3| >= 6 for 2 of 8 patterns
    assert sign_flip_pvalue([1.0] * 5) == (2 / 32, "exact")
    assert sign_flip_pvalue([1.0, -1.0, 2.0, -2.0]) == (1.0, "exact")  # sum 0: every pattern is as extreme
    assert sign_flip_pvalue([0.0, 0.0, 0.0]) == (1.0, "exact")
    assert sign_flip_pvalue([]) == (None, "none")


def test_sign_flip_against_scipy_permutation_test():
    rng = np.random.default_rng(2)
    for n, shift in [(6, 0.0), (10, 0.8), (14, 0.3)]:
        d = rng.normal(shift, 1, n)
        ref = sps.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                                   n_resamples=np.inf).pvalue
        p, method = sign_flip_pvalue(list(d))
        assert method == "exact" and p == pytest.approx(ref, abs=1e-12)


def test_sign_flip_monte_carlo_beyond_exact_limit(monkeypatch):
    d = list(np.random.default_rng(3).normal(0.4, 1, 22))
    p1, m1 = sign_flip_pvalue(d, seed=5)
    assert m1 == "monte-carlo" and p1 == sign_flip_pvalue(d, seed=5)[0]  # seeded: same p again
    monkeypatch.setattr(intervals, "EXACT_MAX", 22)
    exact, m2 = sign_flip_pvalue(d)
    assert m2 == "exact" and abs(p1 - exact) < 0.01  # 1e5 draws: standard error < 0.0016


def test_auroc_and_bootstrap_recomputed():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    y = np.array([0] * 5 + [1] * 12)
    s = np.round(rng.normal(y, 1.0), 1)  # rounded: ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc([1, 1], [0.1, 0.2]) is None
    lo, hi = auroc_interval(y, s, seed=7, resamples=300)
    gen = np.random.default_rng(7)  # the documented draw order, resampled and scored with sklearn
    pos, neg = s[y == 1], s[y == 0]
    ip, ineg = gen.integers(0, pos.size, (300, pos.size)), gen.integers(0, neg.size, (300, neg.size))
    values = [roc_auc_score([1] * pos.size + [0] * neg.size, np.concatenate([pos[a], neg[b]])) for a, b in zip(ip, ineg)]
    assert (lo, hi) == (pytest.approx(np.percentile(values, 2.5), abs=1e-12), pytest.approx(np.percentile(values, 97.5), abs=1e-12))


def test_auroc_bootstrap_width_matches_hanley_mcneil_on_a_large_sample():
    rng = np.random.default_rng(5)
    n = 300
    y = np.array([0] * n + [1] * n)
    s = rng.normal(y * 0.95, 1.0)
    a = auroc(y, s)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    lo, hi = auroc_interval(y, s)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < a < hi


# -- ids and aggregation ----------------------------------------------------------------------------

def test_parse_entry_id_matches_the_zoo_spec(tmp_path):
    from testbed.zoo.spec import parse_spec

    text = """
[data]
synth = { n_train = 20, n_test = 10, size = 32 }
[[attack]]
id = "benign"
[[attack]]
id = "fgba-n1"
attack = "fgba"
preset = "n-to-1"
target = "wall"
trigger = "line"
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign", "fgba-n1"]
seed = [0, 2]
rate = [0.05, 0.1]
epochs = [2, 3]
lr = [0.001]
"""
    spec = parse_spec(tmp_path / "z.toml", text)
    assert len(spec.entries) == 1 * 3 * 2 * 2  # benign + two rates of fgba; two seeds; two epochs values
    for e in spec.entries:
        group, seed = parse_entry_id(e.id)
        assert seed == e.seed
        assert group == {"model": e.model, "attack": e.attack_id, "epochs": e.train["epochs"], "lr": e.train["lr"]}
    assert parse_entry_id("run") is None and parse_entry_id("a--b--x1") is None


def test_aggregate_agrees_with_independent_recomputation():
    rows = zoo_rows()
    got = aggregate(rows)
    expected = recompute_aggregate(rows)
    assert len(got) == len(expected)
    for entry in got:
        g = entry["group"]
        n_ok, n_err, per = expected[(g["model"], g["attack"], entry["defense"])]
        assert set(g) == {"model", "attack"} and (entry["n"], entry["errors"]) == (n_ok, n_err)
        assert set(per) <= set(entry["stats"])
        for name, st in entry["stats"].items():
            if name not in per:
                assert st["n"] == 0 and st["mean"] is None  # a required metric with no value
                continue
            n, mean, std, lo, hi = per[name]
            assert st["n"] == n and st["mean"] == pytest.approx(mean, abs=1e-9)
            for k, v in (("std", std), ("lo", lo), ("hi", hi)):
                assert (st[k] is None) if v is None else st[k] == pytest.approx(v, abs=1e-9), (name, k)
    one = [e for e in got if e["group"] == {"model": "fcn_tiny", "attack": "fgba-11-tsemantic_wall"}]
    assert one and all(e["n"] == 1 and e["seeds"] == [0] and e["stats"]["DER"]["lo"] is None for e in one)
    null = next(e for e in got if e["group"]["attack"] == "fgba-n1-line" and e["group"]["model"] == "deeplabv3_tiny"
                and e["defense"] == "strip")
    assert null["stats"]["ASR_after"]["n"] == 2 and null["stats"]["ASR_before"]["n"] == 3
    assert {"tpr", "fpr", "auroc"} <= set(null["stats"]) and "precision" not in null["stats"]
    json.dumps(got, allow_nan=False)


def test_aggregate_csv_round_trips_and_markdown_says_no_interval():
    ag = aggregate(zoo_rows())
    table = list(csv.DictReader(io.StringIO(aggregate_csv(ag))))
    assert len(table) == len(ag)
    for line, entry in zip(table, ag):
        assert (line["model"], line["attack"], line["defense"]) == (entry["group"]["model"], entry["group"]["attack"], entry["defense"])
        for name, st in entry["stats"].items():
            for k in ("mean", "lo", "hi", "std"):
                assert (line[f"{name}_{k}"] == "") if st[k] is None else float(line[f"{name}_{k}"]) == st[k]
    md = aggregate_markdown(ag)
    assert "n=1, no interval" in md and "±" in md and "### spectral-signature" in md
    der = next(e for e in ag if e["n"] == 3)["stats"]["DER"]
    assert f"{der['mean']:.3f} ± {(der['hi'] - der['lo']) / 2:.3f} [3]" in md


# -- paired comparison ------------------------------------------------------------------------------

def noop_oracle_rows(n_models: int = 12) -> list[dict]:
    rng = np.random.default_rng(6)
    rows = []
    for i in range(n_models):
        before = {"ASR": float(rng.uniform(50, 100)), "mIoU-B": float(rng.uniform(40, 80))}
        m = f"deeplabv3_tiny--fgba-n1-line--s{i}"
        rows.append(make_row(m, "noop", before, dict(before)))
        rows.append(make_row(m, "oracle", before, {"ASR": 0.0, "mIoU-B": before["mIoU-B"]}))
        rows.append(make_row(m, "noop-twin", before, dict(before)))
    return rows


def test_compare_oracle_vs_noop_excludes_zero():
    rows = noop_oracle_rows()
    r = compare(rows, "oracle", "noop")
    assert r["models"] == 12
    der = r["metrics"]["DER"]
    diffs = np.array([x["DER"] for x in rows if x["defense"] == "oracle"]) - 0.5
    lo, hi = sps.t.interval(0.95, 11, loc=diffs.mean(), scale=sps.sem(diffs))
    assert der["n"] == 12 and der["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert (der["lo"], der["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9)) and der["lo"] > 0
    assert der["p"] == 2 / 2 ** 12 and der["test"] == "exact"  # every difference positive: the two extreme patterns
    asr = r["metrics"]["ASR_after"]
    assert asr["hi"] < 0 and asr["mean_a"] == 0.0
    assert r["metrics"]["mIoU-B_after"]["mean"] == 0.0 and r["metrics"]["mIoU-B_after"]["p"] == 1.0
    line = comparison_lines(r)[0]
    assert line.startswith("oracle − noop: DER +") and "n=12 models, p=0.00049" in line


def test_compare_identical_defenses_contains_zero():
    rows = noop_oracle_rows()
    for b in ("noop-twin", "none"):
        r = compare(rows, "noop", b)
        for st in r["metrics"].values():
            assert st["lo"] <= 0 <= st["hi"] and st["p"] >= 0.05
    # a noisy twin: A and B draw independent noise around the same after-scores
    rng = np.random.default_rng(8)
    noisy = []
    for row in noop_oracle_rows():
        if row["defense"] == "noop":
            for d in ("a", "b"):
                noisy.append(make_row(row["model"], d, row["before"], {"ASR": row["before"]["ASR"] * rng.uniform(0.3, 0.7),
                                                                      "mIoU-B": row["before"]["mIoU-B"] - rng.uniform(0, 5)}))
    r = compare(noisy, "a", "b")
    d = np.array([x["DER"] for x in noisy if x["defense"] == "a"]) - np.array([x["DER"] for x in noisy if x["defense"] == "b"])
    ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
    assert r["metrics"]["DER"]["p"] == pytest.approx(ref, abs=1e-12)
    assert r["metrics"]["DER"]["lo"] <= 0 <= r["metrics"]["DER"]["hi"] and ref >= 0.05


def test_no_defense_der_is_der_seg_of_unchanged_scores():
    from testbed.scoring.metrics import der_seg
    from testbed.stats.paired import NO_DEFENSE_DER

    for before in ({"ASR": 93.1, "mIoU-B": 61.7}, {"ASR": 0.0, "mIoU-B": 100.0}):
        assert der_seg(before, before) == NO_DEFENSE_DER


def test_compare_pairs_by_model_and_skips_failures():
    rows = noop_oracle_rows(6)
    rows = [r for r in rows if not (r["defense"] == "noop" and r["model"].endswith("s0"))]  # noop missed one model
    failed = next(r for r in rows if r["defense"] == "oracle" and r["model"].endswith("s1"))
    failed["error"], failed["after"], failed["DER"] = "boom", None, None  # oracle failed on s1
    rows.reverse()  # order must not matter: pairs are matched by id
    r = compare(rows, "oracle", "noop")
    assert r["models"] == 5 and r["failed"] == 1 and r["metrics"]["DER"]["n"] == 4
    r = compare(rows, "oracle", "none")
    assert r["models"] == 6 and r["failed"] == 1 and r["metrics"]["DER"]["n"] == 5


@pytest.mark.parametrize("a,b,message", [
    ("oracle", "oracle", "two different defenses"),
    ("orcale", "noop", "not in the report; it has: noop, oracle, noop-twin"),
    ("none", "oracle", "goes second"),
    ("oracle", "elsewhere", "share no models"),
    ("oracle", "verdict", "neither DER nor after-scores"),
])
def test_compare_refuses_bad_pairs(a, b, message):
    rows = noop_oracle_rows(3)
    rows.append(make_row("other--fgba--s0", "elsewhere", {"ASR": 1.0, "mIoU-B": 1.0}, {"ASR": 1.0, "mIoU-B": 1.0}))
    for r in [r for r in rows if r["defense"] == "noop"]:
        rows.append({**make_row(r["model"], "verdict", r["before"], None), "verdict": {"backdoored": True, "score": 1.0}})
    with pytest.raises(UserError, match=message):
        compare(rows, a, b)


def test_compare_refuses_duplicate_rows():
    rows = noop_oracle_rows(3)
    with pytest.raises(UserError, match="appears twice"):
        compare(rows + rows[:1], "noop", "oracle")


def test_compare_all_and_report_sections():
    rows = noop_oracle_rows(4)
    rows += [{**make_row(r["model"], "nc", r["before"], None), "verdict": {"backdoored": True, "score": 2.0}}
             for r in rows if r["defense"] == "noop"]
    names = [(c["a"], c["b"]) for c in compare_all(rows)]
    assert names == [("noop", "none"), ("oracle", "none"), ("noop-twin", "none"), ("noop", "oracle"),
                     ("noop", "noop-twin"), ("oracle", "noop-twin")]  # the verdict-only defense has nothing to pair
    st = bench_statistics(rows)
    json.dumps(st, allow_nan=False)
    md = statistics_markdown(st)
    assert "## Over seeds" in md and "## Paired comparisons" in md and "## Detection across models" in md
    assert "| oracle − none | 4 |" in md


# -- detection across a zoo -------------------------------------------------------------------------

def verdict_row(model: str, benign: bool, status: str | None, score: float | None, suspected=(), params=None, **kw) -> dict:
    v = None if status is None else {"backdoored": status == "backdoored", "score": score,
                                     "suspected": [list(p) for p in suspected], "status": status, "coverage": 1.0}
    return {"model": model, "defense": "nc", "benign_model": benign, "verdict": v, "attack_params": params,
            "error": None if status else "boom", **kw}


WALL = {"preset": "n-to-1", "target": "wall", "mapping": {"person": "wall", "car": "wall"}}
PALM = {"preset": "1-to-1", "source": "person", "target": "palm", "mapping": {"person": "palm"}}
BADNETS = {"target_image": None, "target_class": "road", "top_k": 5, "chosen_target_image": 3}


def zoo_verdicts() -> list[dict]:
    return [
        verdict_row("b0", True, "clean", 0.5), verdict_row("b1", True, "backdoored", 2.5, [("*", "sky")]),
        verdict_row("b2", True, "inconclusive", 3.0), verdict_row("b3", True, "clean", 1.0),
        verdict_row("f0", False, "backdoored", 4.0, [("*", "wall")], WALL),       # right target
        verdict_row("f1", False, "backdoored", 3.5, [("*", "road")], WALL),       # wrong target
        verdict_row("f2", False, "backdoored", 0.7, [("person", "palm"), ("car", "sky")], PALM),  # right
        verdict_row("f3", False, "backdoored", 2.2, [], PALM),                    # no target named
        verdict_row("n0", False, "backdoored", 5.0, [("*", "road")], BADNETS),    # BadNets: no single target
        verdict_row("m0", False, "clean", 0.9, [], WALL), verdict_row("i0", False, "inconclusive", 9.0, [], WALL),
        verdict_row("e0", False, None, None),  # a failed run
    ]


def test_detection_counts_hand_worked():
    (s,) = detection_summary(zoo_verdicts())
    assert (s["models"], s["benign"], s["backdoored"], s["errors"]) == (11, 4, 7, 1)
    assert s["inconclusive"] == {"benign": 1, "backdoored": 1} and s["decided"] == 9
    # decided: benign b0 clean, b1 FP, b3 clean; backdoored f0..f3, n0 detected (5), m0 missed
    assert (s["tpr"]["k"], s["tpr"]["n"], s["fpr"]["k"], s["fpr"]["n"]) == (5, 6, 1, 3)
    assert (s["accuracy"]["k"], s["accuracy"]["n"]) == (7, 9) and s["accuracy"]["value"] == 7 / 9
    ci = sps.binomtest(5, 6).proportion_ci(0.95, method="wilson")
    assert (s["tpr"]["lo"], s["tpr"]["hi"]) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert s["detected"] == {"right_target": 2, "wrong_target": 1, "target_not_named": 1, "no_single_target": 1}


def test_detection_auroc_over_decided_verdicts():
    from sklearn.metrics import roc_auc_score

    (s,) = detection_summary(zoo_verdicts(), seed=3)
    decided = [r for r in zoo_verdicts() if r["verdict"] and r["verdict"]["status"] != "inconclusive"]
    y = [0 if r["benign_model"] else 1 for r in decided]
    sc = [r["verdict"]["score"] for r in decided]
    assert s["auroc"]["value"] == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
    assert (s["auroc"]["lo"], s["auroc"]["hi"]) == auroc_interval(y, sc, seed=3)
    assert (s["auroc"]["n_benign"], s["auroc"]["n_backdoored"]) == (3, 6)


def test_detection_targets_argument_overrides_row_params():
    rows = zoo_verdicts()
    (s,) = detection_summary(rows, targets={"f1": ["road"], "n0": None, "f0": ("sky",)})
    assert s["detected"] == {"right_target": 2, "wrong_target": 1, "target_not_named": 1, "no_single_target": 1}


def test_true_targets_from_real_poisoned_files(fgba_line_path, fgba_11_semantic_path, badnets_line_path):
    import h5py

    def params(path):
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["attack"])["params"]

    assert true_targets(params(fgba_line_path)) == {"wall"}
    assert true_targets(params(fgba_11_semantic_path)) == {"palm"}
    assert true_targets(params(badnets_line_path)) is None
    assert true_targets({"map": "person:palm,car:road", "mapping": {"person": "palm", "car": "road"}}) == {"palm", "road"}
    assert true_targets(None) is None


def test_a_damaged_value_is_a_user_error():
    rows = noop_oracle_rows(3)
    rows[0]["DER"] = "high"
    with pytest.raises(UserError, match="DER is 'high', not a number"):
        compare(rows, "noop", "oracle")


# -- a defense is its name and parameters (issue 24, trap 3 and 7) -----------------------------------

def blur_rows() -> list[dict]:
    """blur σ=1 on seed 1, blur σ=0.5 on seed 0 (merged into one report), fine-pruning on both."""
    rows = []
    for s, sigma, asr_after in ((0, 0.5, 90.0), (1, 1.0, 10.0)):
        eid = f"deeplabv3_tiny--fgba-n1-line--s{s}"
        before = {"ASR": 95.0, "mIoU-B": 60.0}
        rows.append(make_row(eid, "blur", before, {"ASR": asr_after, "mIoU-B": 59.0},
                             settings={"params": {"sigma": sigma}, "defense": "mypkg.blur:Blur"}))
        rows.append(make_row(eid, "fine-pruning", before, {"ASR": 50.0, "mIoU-B": 58.0},
                             settings={"params": {}, "defense": "fine-pruning"}))
    return rows


def test_rows_with_other_parameters_are_other_defenses_in_every_statistic():
    rows = blur_rows()
    agg = aggregate(rows)
    assert sorted({a["defense"] for a in agg}) == ["blur[sigma=0.5]", "blur[sigma=1.0]", "fine-pruning"]
    # the over-seeds bucket of σ=0.5 holds its one seed only: the ASR after is 90, not the pooled mean 50
    (half,) = [a for a in agg if a["defense"] == "blur[sigma=0.5]"]
    assert half["n"] == 1 and half["stats"]["ASR_after"]["mean"] == 90.0
    pairs = {(c["a"], c["b"]) for c in compare_all(rows)}
    assert ("blur[sigma=0.5]", "fine-pruning") in pairs and ("blur", "fine-pruning") not in pairs
    md = statistics_markdown(bench_statistics(rows))
    assert "### blur[sigma=0.5]" in md and "### blur\n" not in md


def test_compare_takes_the_report_name_the_label_or_the_name_typed_to_bench():
    rows = blur_rows()
    one = [r for r in rows if r["defense"] == "fine-pruning" or r["settings"]["params"]["sigma"] == 1.0]
    # one parameter set of blur in the report: its bare name and the module:Class typed to bench both work
    for name in ("blur", "mypkg.blur:Blur", "blur[sigma=1.0]"):
        assert compare(one, name, "fine-pruning")["a"] == "blur[sigma=1.0]"
    # two parameter sets: the bare name is ambiguous, and the error lists both
    with pytest.raises(UserError, match=r"names 2 defenses .*blur\[sigma=0.5\], blur\[sigma=1.0\]"):
        compare(rows, "blur", "fine-pruning")
    assert compare(rows, "blur[sigma=0.5]", "none")["models"] == 1


# -- interval and test reconciled (issue 24, trap 4) ---------------------------------------------------

def test_too_few_models_for_the_test_is_said_next_to_the_number():
    # two models, both differences negative: the t-interval excludes 0, but 2 of 4 sign patterns are as extreme
    rows = []
    for i, (a, b) in enumerate(((0.30, 0.36), (0.31, 0.374))):
        before = {"ASR": 90.0, "mIoU-B": 60.0}
        rows += [dict(make_row(f"m--x--s{i}", "blur", before, before), DER=a),
                 dict(make_row(f"m--x--s{i}", "fine-pruning", before, before), DER=b)]
    der = compare(rows, "blur", "fine-pruning")["metrics"]["DER"]
    lo, hi = der["lo"], der["hi"]
    diffs = np.array([0.30 - 0.36, 0.31 - 0.374])
    half = sps.t.ppf(0.975, 1) * diffs.std(ddof=1) / math.sqrt(2)
    assert math.isclose(lo, diffs.mean() - half) and math.isclose(hi, diffs.mean() + half) and hi < 0
    assert der["p"] == 0.5 and der["p_min"] == 0.5  # 2 / 2^2
    assert "p cannot go below 0.5; p < 0.05 needs at least 6" in der["note"]
    line = comparison_lines(compare(rows, "blur", "fine-pruning"))[0]
    assert "p=0.5 (too few models for the test" in line


def test_smallest_p_and_models_needed_by_enumeration():
    from testbed.stats.paired import models_needed, smallest_p

    for n in range(1, 9):  # the smallest p over every sign of n unequal non-zero differences, enumerated
        d = np.arange(1, n + 1, dtype=float)
        assert math.isclose(smallest_p(n), sign_flip_pvalue(d)[0])
    assert models_needed(0.05) == 6 and sign_flip_pvalue(np.ones(5))[0] >= 0.05 > sign_flip_pvalue(np.ones(6))[0]


def test_interval_excluding_zero_beside_a_non_rejecting_p_is_flagged():
    from testbed.stats.paired import reconcile

    # 7 differences, one negative: the t-interval excludes 0 but 8 of 128 sign patterns are as extreme (p=0.0625)
    diffs = [1, 1.1, 0.9, 1, 1.2, 0.8, -0.9]
    stat = {**mean_interval(diffs), "p": sign_flip_pvalue(diffs)[0], "test": "exact"}
    assert stat["lo"] > 0 and stat["p"] == 8 / 128
    assert "t-interval and the sign-flip test disagree" in reconcile(stat, diffs)["note"]
    agree = [1, 1.1, 0.9, 1, 1.2, 0.8, -0.5]  # p = 4/128 and the interval excludes 0: nothing to reconcile
    s2 = {**mean_interval(agree), "p": sign_flip_pvalue(agree)[0], "test": "exact"}
    assert s2["lo"] > 0 and s2["p"] == 4 / 128 and reconcile(s2, agree)["note"] is None


def test_monte_carlo_p_is_labelled(monkeypatch):
    monkeypatch.setattr(intervals, "EXACT_MAX", 4)
    rows = []
    for i in range(8):
        before = {"ASR": 90.0, "mIoU-B": 60.0}
        rows += [dict(make_row(f"m--x--s{i}", "a", before, before), DER=0.6 + 0.01 * i),
                 dict(make_row(f"m--x--s{i}", "b", before, before), DER=0.5)]
    result = compare(rows, "a", "b")
    assert result["metrics"]["DER"]["test"] == "monte-carlo"
    assert "(Monte Carlo)" in comparison_lines(result)[0] and "p\u2248" in comparison_lines(result)[0]
