"""`testbed demo`: built through the zoo, the same numbers however many workers ran, resumable, an honest report.

A small demo (48 training images, 1 epoch, two defenses: fine-pruning and STRIP) runs twice: once in this process (``--workers 1``) and
once with two worker processes.  Every model trains with one thread in both, so both give the same bytes — the
serial-vs-parallel check of the zoo build the demo is made of — and the same results.json numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from testbed import cli
from testbed.data import h5data

BASE = ["--n-train", "48", "--n-test", "16", "--size", "32", "--epochs", "1", "--device", "cpu"]
SMALL = [*BASE, "--defenses", "fine-pruning,strip"]
NUMBERS = ("before", "after", "DER", "detection", "flagged", "verdict")  # a defense row's numbers (not its timing)


def _demo(out: Path, *extra: str) -> int:
    return cli.main(["-q", "demo", "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo")
    serial, parallel = root / "serial", root / "parallel"
    assert _demo(serial, "--workers", "1") == 0
    assert _demo(parallel, "--workers", "2") == 0
    return serial, parallel


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _entries(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / "work" / "zoo" / "entries").iterdir()) if p.is_dir()}


def _row(results: dict, attack: str, trigger: str | None, reference: str | None = None) -> dict:
    return next(r for r in results["attacks"]
                if r["attack"] == attack and r["trigger"] == trigger and r.get("reference") == reference)


def test_same_numbers_and_bytes_with_one_or_two_workers(demos):
    serial, parallel = demos
    a, b = _results(serial), _results(parallel)
    assert a["config"]["workers"] == 1 and b["config"]["workers"] == 2
    assert a["config"]["threads"] == b["config"]["threads"] == 1
    assert len(a["attacks"]) == 13 and a["attacks"] == b["attacks"]
    assert a["targets"] == b["targets"]
    # two defenses, one per worker process in the parallel run: the same rows, in the same order, as one process
    assert [d["defense"] for d in a["defenses"]] == [d["defense"] for d in b["defenses"]] == ["fine-pruning", "strip"]
    assert [{k: d.get(k) for k in NUMBERS} for d in a["defenses"]] == [{k: d.get(k) for k in NUMBERS} for d in b["defenses"]]
    ea, eb = _entries(serial), _entries(parallel)
    assert sorted(ea) == sorted(eb) and len(ea) == 7
    for name in ea:  # a serial zoo build and a 2-worker one give the same weights, entry by entry
        assert (ea[name] / "model.safetensors").read_bytes() == (eb[name] / "model.safetensors").read_bytes(), name
        for d in (ea[name], eb[name]):
            assert json.loads((d / "config.json").read_text())["threads"] == 1
            starts = [json.loads(line) for line in (d / "zoo_log.jsonl").read_text().splitlines()]
            assert [s["threads"] for s in starts if s["event"] == "start"] == [1]


def test_rerun_reuses_the_models_and_gives_the_same_numbers(demos, capsys):
    serial, _ = demos
    before = _results(serial)
    stamps = {n: (d / "model.safetensors").stat().st_mtime_ns for n, d in _entries(serial).items()}
    assert _demo(serial) == 0  # --workers auto; workers are not a setting of the numbers: the cache is reused
    assert {n: (d / "model.safetensors").stat().st_mtime_ns for n, d in _entries(serial).items()} == stamps
    after = _results(serial)
    assert after["attacks"] == before["attacks"] and after["targets"] == before["targets"]

    settings = (serial / "work" / "settings.json").read_bytes()
    capsys.readouterr()
    assert _demo(serial, "--threads", "2") == 2  # the thread count changes the numbers: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "threads 1 → 2" in err[0]
    assert (serial / "work" / "settings.json").read_bytes() == settings


def test_models_trained_on_another_kind_of_device_are_not_reused(demos, monkeypatch, capsys):
    """A rerun on CUDA must not report CPU-trained models as its own: refused before anything runs or is written."""
    import torch

    import testbed.demo.run

    serial, _ = demos
    settings = (serial / "work" / "settings.json").read_bytes()
    assert json.loads(settings)["device"] == "cpu"
    monkeypatch.setattr(testbed.demo.run, "resolve_device", lambda spec="auto": torch.device("cuda"))
    capsys.readouterr()
    assert cli.main(["-q", "demo", "--out", str(serial), *[f for f in SMALL if f not in ("--device", "cpu")], "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "device 'cpu' → 'cuda'" in err[0]
    assert (serial / "work" / "settings.json").read_bytes() == settings


def test_semantic_fgba_poisons_exactly_the_images_with_wall_and_person(demos):
    serial, _ = demos
    results = _results(serial)
    clean = serial / "work" / "zoo" / "data" / "clean.h5"
    with h5data.open_dataset(clean) as f:
        labels = f["train/labels"][()]
        wall, person = f.class_id("wall"), f.class_id("person")
    expected = np.flatnonzero([(y == wall).any() and (y == person).any() for y in labels])
    spec = (serial / "work" / "zoo.toml").read_text()
    assert spec.count('require = "person"') == 2  # both fine-grained semantic settings, as the paper selects them
    for setting, attack in (("fgba-n-to-1-semantic", "fgba-n-to-1"), ("fgba-1-to-1-semantic", "fgba-1-to-1")):
        entry = _entries(serial)[f"deeplabv3_tiny--{setting}--s0"]
        data = json.loads((entry / "config.json").read_text())["dataset"]["path"]
        with h5data.open_dataset(data, check_labels=False) as f:
            assert np.array_equal(np.sort(f["train/poison_index"][()]), expected)
        assert _row(results, attack, "semantic:wall")["rate"] == pytest.approx(expected.size / len(labels))


def test_report_shows_both_benign_scores_and_says_one_seed(demos):
    serial, _ = demos
    results = _results(serial)
    report = (serial / "report.md").read_text()
    assert "One seed; see docs/results.md for 3-seed intervals" in report
    assert "SPEC" not in report and "§7" not in report
    assert "mIoU-B-all" in report and "PA-B-all" in report and "compare them with our **PA-A** column" in report
    clean = _row(results, "benign", None)
    for attack in ("badnets", "fgba-n-to-1", "fgba-1-to-1"):
        line = _row(results, "benign", "line", attack)
        assert line["mIoU-B-all"] == pytest.approx(line["mIoU-B"])  # a line trigger leaves every test image benign
        trigger = "semantic:grass" if attack == "badnets" else "semantic:wall"
        sem = _row(results, "benign", trigger, attack)
        # the whole clean test set, whichever attack's file it was read from: the benign model's clean score
        assert sem["mIoU-B-all"] == pytest.approx(clean["mIoU-B"]) and sem["PA-B-all"] == pytest.approx(clean["PA-B"])
        assert f"| {_fmt(sem['mIoU-B'])} | {_fmt(sem['mIoU-B-all'])} |" in report
    for s in ("figure-fgba.png", "figure-badnets.png"):
        assert (serial / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def test_workers_auto_is_cores_over_threads(monkeypatch):
    from testbed.zoo import build as zb

    monkeypatch.setattr(zb, "usable_cores", lambda: 8)
    assert [zb.auto_workers(t, "cpu") for t in (1, 2, 3, 8, 9)] == [8, 4, 2, 1, 1]


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


@pytest.mark.parametrize("flags, words", [
    (["--workers", "x"], "--workers: expected an integer or auto"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_demo_flags_exit_2_with_one_line(flags, words, tmp_path, capsys):
    assert _exit_code(["-q", "demo", "--out", str(tmp_path / "d"), *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "d").exists()


def test_zoo_build_workers_auto_and_bad_workers(tmp_path, capsys):
    assert _exit_code(["-q", "zoo", "build", str(tmp_path / "none.toml"), "--out", str(tmp_path / "z"),
                       "--workers", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected an integer or auto" in err[0]


def test_reference_benchmark_spec_is_the_demo_over_three_seeds():
    """examples/zoo-bench.toml must not drift from the demo: same data, training and attack settings."""
    from testbed.demo.settings import DemoConfig, zoo_spec
    from testbed.zoo.spec import parse_spec

    bench = parse_spec(Path(__file__).resolve().parents[1] / "examples" / "zoo-bench.toml")
    demo = parse_spec(Path("demo.toml"), text=zoo_spec(DemoConfig()))
    assert len(bench.entries) == 21 and sorted({e.seed for e in bench.entries}) == [0, 1, 2]
    assert bench.data == demo.data and bench.train == demo.train
    assert {v.label: v.params for v in bench.variants} == {v.label: v.params for v in demo.variants}
    assert {e.model for e in bench.entries} == {"deeplabv3_tiny"}


def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "d"
    assert _exit_code(["-q", "demo", "--out", str(out), "--model", "deeplabv3_tiyn"]) == 2
    assert _exit_code(["-q", "demo", "--out", str(out), "--size", "7"]) == 2
    assert _exit_code(["-q", "demo", "--out", str(out), "--defenses", "fine-pruning,strp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "did you mean 'deeplabv3_tiny'" in err[0] and "size" in err[1]
    assert "--defenses: unknown defense 'strp' (did you mean 'strip'?)" in err[2]
    assert not out.exists()


def test_architecture_spec_matches_the_reference_benchmark():
    """examples/zoo-arch.toml's segformer entries pair with the reference zoo's deeplabv3 entries (zoo-bench-fp32.toml,
    the zoo docs/results.md reports): same data, training (precision included), attacks."""
    from testbed.zoo.spec import parse_spec

    root = Path(__file__).resolve().parents[1] / "examples"
    arch, bench = parse_spec(root / "zoo-arch.toml"), parse_spec(root / "zoo-bench-fp32.toml")
    assert arch.data == bench.data and arch.train == bench.train
    bench_variants = {v.label: v.params for v in bench.variants}
    for v in arch.variants:
        assert bench_variants[v.label] == v.params, v.label
    assert {e.model for e in arch.entries} == {"segformer_tiny"} and sorted({e.seed for e in arch.entries}) == [0, 1, 2]
    assert len(arch.entries) == 12


# -- the three kinds of defense: trigger synthesis as a cost analysis by default -------------------------------
def test_demo_defaults_run_trigger_synthesis_on_its_first_candidate():
    from testbed.demo.settings import DEFAULT_DEFENSES, defense_params

    assert {"fine-pruning", "trigger-synthesis", "strip"} <= set(DEFAULT_DEFENSES)  # repair, cost analysis, filter
    assert defense_params(DEFAULT_DEFENSES, []) == {"trigger-synthesis": {"max_candidates": 1}}
    full = defense_params(DEFAULT_DEFENSES, ["trigger-synthesis.max_candidates=null", "strip.n_overlays=16"])
    assert full == {"trigger-synthesis": {"max_candidates": None}, "strip": {"n_overlays": 16}}
    assert defense_params(("strip",), []) == {}  # the default is only for a defense that runs


@pytest.mark.parametrize("flags, words", [
    (["--defenses", "strip", "--param", "trigger-synthesis.steps=3"], "'trigger-synthesis' is not one of the --defenses names"),
    (["--param", "trigger-synthesis.max_candidates=0"], "max_candidates"),
    (["--defenses", "", "--param", "strip.n_overlays=4"], "no defense runs"),
])
def test_bad_demo_params_exit_2_with_one_line_before_anything_is_written(flags, words, tmp_path, capsys):
    argv = ["-q", "demo", "--out", str(tmp_path / "d"), *BASE, *flags]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "d").exists()


def test_cost_table_projects_the_measured_candidate_to_every_search_space():
    """passes = passes per candidate × candidates, seconds = passes × seconds per pass, as computed here."""
    from testbed.demo.report import _defense_table

    per, spp, k = 8100.0, 0.004, 11
    cost = {"candidates_run": 1, "candidates_in_mode": k, "coverage_of_mode": 1 / k, "steps_per_candidate": 81.0,
            "max_steps": 1000, "step_unit": "epoch over the clean subset",
            "counts": {"image": k, "pairs": k * (k - 1), "log10_matrices": 11.46},
            "ade20k_counts": {"image": 150, "pairs": 22350, "log10_matrices": 326.4},
            "projected": {"passes_per_candidate": per, "seconds_per_pass": spp, "image_passes": per * k,
                          "image_seconds": per * k * spp, "pairs_passes": per * k * (k - 1),
                          "pairs_seconds": per * k * (k - 1) * spp, "log10_matrices_seconds": 13.0},
            "projected_ade20k": {"image_seconds": 3e5, "pairs_seconds": 4.5e7, "log10_matrices_seconds": 329.7}}
    row = {"defense": "trigger-synthesis", "verdict": {"status": "inconclusive", "score": 0.0, "coverage": 1 / k},
           "details": {"cost": cost, "steps": {"*->wall": 81}}, "cost": {"seconds": 32.0}}
    text = "\n".join(_defense_table([row]))
    most = per / 81 * 1000  # every candidate runs all 1000 epochs: the upper bound
    assert (f"| one class → another (1-to-1) | 110 | {per * 110:,.0f} | {per * 110 * spp / 60:,.1f} minutes | "
            f"{most * 110:,.0f} | {most * 110 * spp / 3600:,.1f} hours | 22,350 |") in text
    assert f"| every pixel → one class (N-to-1) | 11 | {per * 11:,.0f} | {per * 11 * spp / 60:,.1f} minutes |" in text
    assert "*->wall (81 steps)" in text  # the report names the candidate it measured
    assert "cost analysis" in text and "max_candidates=null" in text  # a partial search says why it is inconclusive
