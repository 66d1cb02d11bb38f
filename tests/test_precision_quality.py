"""benchmarks/precision_quality.py: the fp32-vs-bf16 table's statistics, its decision rule and its refusals.

The expectations are computed here from first principles (scipy's t quantile, all 2^n sign patterns by hand),
not by the testbed.stats functions the script calls.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

from testbed.cli import main as cli_main
from testbed.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("precision_quality", REPO / "benchmarks" / "precision_quality.py")
pq = importlib.util.module_from_spec(_spec)
sys.modules["precision_quality"] = pq  # dataclasses look their module up
_spec.loader.exec_module(pq)

CONFIG = {"model": "deeplabv3_tiny", "epochs": 11, "batch_size": 8, "lr": 0.002}


def fake_zoo(name: str, precision: str, values: dict[str, list[tuple[float, float | None]]], **config) -> "pq.Zoo":
    """A Zoo in memory: ``values[attack]`` = [(mIoU-B, ASR) per seed]."""
    entries, used = {}, {}
    for attack, per_seed in values.items():
        for seed, (miou, asr) in enumerate(per_seed):
            key = ("deeplabv3_tiny", attack, seed)
            entries[key] = {"id": f"deeplabv3_tiny--{attack}--s{seed}", "attack": None if attack == "benign" else {"name": attack},
                            "config": {**CONFIG, **config, "seed": seed, "precision": precision},
                            "metrics": {"mIoU-B": miou, "ASR": asr}}
            used[key] = precision
    return pq.Zoo(Path(name), entries, used, len(entries))


def t_interval(xs):
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def sign_flip_p(diffs):
    obs = abs(sum(diffs))
    pats = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(p, diffs))) >= obs - 1e-12 for p in pats) / len(pats)


FP32 = {"benign": [(60.0, None), (62.0, None), (61.0, None)], "badnets": [(58.0, 90.0), (59.0, 95.0), (57.5, 92.0)]}
BF16 = {"benign": [(60.5, None), (62.5, None), (61.8, None)], "badnets": [(58.2, 91.0), (58.0, 94.0), (57.9, 93.5)]}


def test_table_matches_hand_computed_intervals_and_sign_flip_p():
    res = pq.compare_zoos(fake_zoo("a", "fp32", FP32), fake_zoo("b", "bf16", BF16))
    rows = {(r["setting"], r["metric"]): r for r in res["rows"]}
    assert set(rows) == {("benign", "mIoU-B"), ("badnets", "mIoU-B"), ("badnets", "ASR")}  # benign has no ASR
    for (attack, metric), row in rows.items():
        col = 0 if metric == "mIoU-B" else 1
        xa, xb = [v[col] for v in FP32[attack]], [v[col] for v in BF16[attack]]
        for side, xs in (("a", xa), ("b", xb)):
            mean, lo, hi = t_interval(xs)
            assert row[side]["mean"] == pytest.approx(mean) and row[side]["lo"] == pytest.approx(lo)
            assert row[side]["hi"] == pytest.approx(hi)
        diffs = [y - x for x, y in zip(xa, xb)]
        mean, lo, hi = t_interval(diffs)
        assert (row["diff"]["mean"], row["diff"]["lo"], row["diff"]["hi"]) == pytest.approx((mean, lo, hi))
        assert row["diff"]["p"] == pytest.approx(sign_flip_p(diffs)) and row["diff"]["test"] == "exact"
        assert row["overlap"] is True
    assert rows[("benign", "mIoU-B")]["diff"]["p"] == pytest.approx(0.25)  # 3 positive diffs: 2 of 8 patterns
    pooled = {r["metric"]: r for r in res["pooled"]}
    all_diffs = [b[0] - a[0] for k in FP32 for a, b in zip(FP32[k], BF16[k])]
    assert pooled["mIoU-B"]["diff"]["n"] == 6 and pooled["mIoU-B"]["diff"]["p"] == pytest.approx(sign_flip_p(all_diffs))
    assert res["decided"] and res["bf16_ok"]
    text = pq.render(res)
    assert "decision: every interval overlaps" in text and "| badnets | ASR |" in text and "bf16 − fp32" in text


def test_disjoint_intervals_keep_fp32_and_name_the_setting():
    worse = {**BF16, "badnets": [(58.2, 70.0), (58.0, 71.0), (57.9, 70.5)]}  # ASR far below fp32's 90-95
    res = pq.compare_zoos(fake_zoo("a", "fp32", FP32), fake_zoo("b", "bf16", worse))
    apart = [(r["setting"], r["metric"]) for r in res["rows"] if r["overlap"] is False]
    assert apart == [("badnets", "ASR")]
    assert res["decided"] and not res["bf16_ok"]
    assert "intervals do not overlap for badnets ASR: `--precision auto` stays fp32" in pq.decision_text(res)


def test_one_seed_gives_no_interval_and_no_decision():
    one = {k: v[:1] for k, v in FP32.items()}
    res = pq.compare_zoos(fake_zoo("a", "fp32", one), fake_zoo("b", "bf16", {k: v[:1] for k, v in BF16.items()}))
    assert all(r["overlap"] is None for r in res["rows"]) and not res["decided"] and not res["bf16_ok"]
    assert "no decision" in pq.render(res)


def test_entries_missing_from_one_zoo_are_left_out_and_counted():
    partial = fake_zoo("b", "bf16", {"benign": BF16["benign"][:2]})
    res = pq.compare_zoos(fake_zoo("a", "fp32", FP32), partial)
    assert res["pairs"] == 2 and res["missing"] == (4, 0)
    assert [r["seeds"] for r in res["rows"]] == [[0, 1]]
    assert res["rows"][0]["overlap"] is True and not res["decided"] and not res["bf16_ok"]  # unfinished: no decision
    assert pq.decision_text(res).startswith("no decision: 4 planned entries are not finished in both zoos")


def test_refuses_zoos_that_differ_beyond_precision_or_share_a_precision():
    with pytest.raises(UserError, match="more than precision \\(epochs\\)"):
        pq.compare_zoos(fake_zoo("a", "fp32", FP32), fake_zoo("b", "bf16", BF16, epochs=12))
    with pytest.raises(UserError, match="both zoos trained in fp32"):
        pq.compare_zoos(fake_zoo("a", "fp32", FP32), fake_zoo("b", "fp32", BF16))
    with pytest.raises(UserError, match="share no finished entry"):
        pq.compare_zoos(fake_zoo("a", "fp32", FP32), fake_zoo("b", "bf16", {}))


TINY = """
[data]
synth = {{ n_train = 24, n_test = 8, size = 32, seed = 0 }}
[train]
epochs = 1
batch_size = 8
precision = "{precision}"
[[attack]]
id = "benign"
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign"]
seed = [0]
"""


def test_reads_two_built_zoos_and_bad_input_is_one_line(tmp_path, capsys):
    for precision in ("fp32", "bf16"):
        spec = tmp_path / f"{precision}.toml"
        spec.write_text(TINY.format(precision=precision))
        assert cli_main(["-q", "zoo", "build", str(spec), "--out", str(tmp_path / precision), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert pq.main([str(tmp_path / "fp32"), str(tmp_path / "bf16")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'fp32'} (fp32) and {tmp_path / 'bf16'} (bf16); 1 paired entries" in out
    assert "| benign | mIoU-B |" in out and "no decision" in out  # one seed: no interval
    assert pq.main([str(tmp_path / "fp32"), str(tmp_path / "fp32")]) == 2
    assert pq.main([str(tmp_path / "fp32"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert err.out == "" and len(lines) == 2 and all(ln.startswith("precision_quality: error: ") for ln in lines)
    assert "both zoos trained in fp32" in lines[0] and "Traceback" not in err.err


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pinned_specs_are_the_reference_benchmark_at_one_precision(precision):
    """examples/zoo-bench-bf16.toml and zoo-bench-fp32.toml (the zoo docs/results.md reports, which zoo-arch.toml
    pairs with) pair entry for entry with examples/zoo-bench.toml; only the precision differs."""
    from testbed.zoo.spec import parse_spec

    bench, pinned = parse_spec(REPO / "examples" / "zoo-bench.toml"), parse_spec(REPO / "examples" / f"zoo-bench-{precision}.toml")
    assert pinned.train == {**bench.train, "precision": precision} and "precision" not in bench.train
    assert pinned.data == bench.data
    assert {v.label: v.params for v in pinned.variants} == {v.label: v.params for v in bench.variants}
    assert [(e.id, e.seed) for e in pinned.entries] == [(e.id, e.seed) for e in bench.entries] and len(pinned.entries) == 21
