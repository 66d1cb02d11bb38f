"""The pytest robustness-suite plugin, exercised with pytest's own ``pytester`` on a real tiny zoo."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from testbed.cli import main as cli

pytest_plugins = ["pytester"]

SPEC = """\
[data]
synth = { n_train = 96, n_test = 24, size = 32, seed = 0 }
[train]
epochs = 5
batch_size = 16
[[attack]]
id = "benign"
[[attack]]
id = "n1-line"
attack = "fgba"
preset = "n-to-1"
target = "wall"
trigger = "line"
rate = 0.25
[grid]
model = ["deeplabv3_tiny"]
attack = ["benign", "n1-line"]
seed = [0]
"""

# Test-local defenses: a no-op, an oracle filter that knows the trigger (black top rows), a crashing one.
DEFENSES = """\
import numpy as np
from testbed.defense import DefenseResult

class NoOp:
    name = "no-op"
    def run(self, model, ctx):
        return DefenseResult(model=model)

class OracleLineFilter:
    name = "oracle-line-filter"
    def run(self, model, ctx):
        def scores(images):
            top = np.asarray(images)[:, :2].reshape(len(images), -1)
            return (top.max(axis=1) == 0).astype(float)
        return DefenseResult(input_scores=scores, threshold=0.5)

class Crashes:
    name = "crashes"
    def run(self, model, ctx):
        raise RuntimeError("boom on purpose")

class AlwaysBackdoored:
    # a verdict-only defense that calls every model backdoored (right on half of the zoo)
    name = "always-backdoored"
    def __init__(self, score=1.0):
        self.score = score
    def run(self, model, ctx):
        from testbed.defense import Verdict
        return DefenseResult(verdict=Verdict(backdoored=True, score=self.score, suspected=[("*", "wall")]))

class RejectAll:
    name = "reject-all"
    def run(self, model, ctx):
        return DefenseResult(input_scores=lambda images: np.ones(len(images)), threshold=0.5)
"""


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("suite-zoo")
    spec = tmp / "zoo.toml"
    spec.write_text(SPEC)
    assert cli(["-q", "zoo", "build", str(spec), "--out", str(tmp / "zoo"), "--device", "cpu"]) == 0
    return tmp / "zoo"


def _backdoored_asr(zoo: Path) -> float:
    from testbed.zoo import open as open_zoo

    (entry,) = [e for e in open_zoo(zoo) if not e.is_benign]
    return float(entry.metrics["ASR"])


def _run(pytester, zoo: Path, defense: str, *extra: str):
    pytester.makepyfile(mydefs=DEFENSES)
    pytester.syspathinsert()
    return pytester.runpytest("--pyargs", "testbed.suites", "--defense", f"mydefs:{defense}", "--zoo", str(zoo), *extra)


def test_no_op_defense_fails_asr_on_backdoored_and_passes_on_benign(pytester, tiny_zoo):
    asr = _backdoored_asr(tiny_zoo)
    assert asr > 20, f"the tiny backdoored model must have a working backdoor for this test (ASR {asr})"
    limit = asr / 2  # any threshold below the measured ASR must fail a defense that changes nothing
    r = _run(pytester, tiny_zoo, "NoOp", "--max-asr", f"{limit}", "--min-asr", "0", "-k", "test_asr", "-rfs",
             "-p", "no:cacheprovider")
    r.assert_outcomes(failed=1, skipped=1)
    out = r.stdout.str()
    r.stdout.fnmatch_lines(["FAILED *test_asr?no-op:deeplabv3_tiny--n1-line--s0?*"])  # the id carries the defense
    r.stdout.fnmatch_lines(["SKIPPED * benign entry: no backdoor to remove or detect"])
    # the failure message states the measured ASR and the threshold, in one line, without the settings' dump
    assert f"ASR after no-op is {asr:.1f}% > max {limit:g}% (before: {asr:.1f}%)" in out
    assert "SuiteSettings(" not in out and "zoo_entry =" not in out and "assert " not in out


def test_a_defense_that_meets_the_thresholds_passes(pytester, tiny_zoo):
    r = _run(pytester, tiny_zoo, "OracleLineFilter", "--max-asr", "5", "--max-miou-drop", "1", "--budget", "600",
             "--min-asr", "0", "-p", "no:cacheprovider")
    # filter criteria: asr (backdoored), miou_drop ×2, tpr (backdoored), fpr ×2, budget ×2, deterministic ×2, no-crash;
    # skipped: asr and tpr on the benign entry, the verdict criteria (2 entries + 2 zoo-wide)
    r.assert_outcomes(passed=11, skipped=6)


def test_crashing_defense_fails_that_entry_not_the_session(pytester, tiny_zoo, tmp_path):
    xml = tmp_path / "junit.xml"
    r = _run(pytester, tiny_zoo, "Crashes", "-k", "test_asr or test_no_crash", f"--junitxml={xml}",
             "-p", "no:cacheprovider")
    r.assert_outcomes(failed=3)  # asr on both entries + no-crash on the benign one; no errors
    assert "the defense crashed on this model: RuntimeError: boom on purpose" in r.stdout.str()
    junit = xml.read_text()
    assert junit.count("<testcase ") == 3 and 'errors="0"' in junit


def test_x_stops_at_first_failure(pytester, tiny_zoo):
    r = _run(pytester, tiny_zoo, "Crashes", "-x", "-p", "no:cacheprovider")
    r.assert_outcomes(failed=1)


def test_without_zoo_the_suite_skips_instead_of_failing(pytester):
    r = pytester.runpytest("--pyargs", "testbed.suites", "-p", "no:cacheprovider")
    outcomes = r.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 1 and "failed" not in outcomes and "error" not in outcomes


def test_a_verdict_defense_is_tested_on_its_verdicts(pytester, tiny_zoo):
    r = _run(pytester, tiny_zoo, "AlwaysBackdoored", "--defense-param", "score=2.5", "--min-detection-accuracy", "1",
             "--min-asr", "0", "-rfs", "-p", "no:cacheprovider", "-k", "not deterministic and not budget")
    out = r.stdout.str()
    # verdict: right on the backdoored entry, wrong on the benign one; zoo accuracy 1/2; no ASR/mIoU/filter criteria
    r.assert_outcomes(passed=2, failed=2, skipped=9)
    assert "always-backdoored says backdoored (score 2.5) on a benign entry; expected clean" in out
    assert "detection accuracy 1/2 = 0.5 < min 1 (inconclusive: 0)" in out
    assert "returned no repair or retrain or filter (it returned: verdict)" in out
    assert "no ASR measured" not in out and "SuiteSettings(" not in out


def test_filter_criteria_state_counts(pytester, tiny_zoo):
    r = _run(pytester, tiny_zoo, "RejectAll", "-k", "filter", "--min-asr", "0", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=1, failed=2, skipped=1)  # tpr 1.0 passes; fpr fails on both entries
    assert "reject-all rejected 24 of 24 benign inputs: FPR 1.000 > max 0.1" in r.stdout.str()


def test_an_attack_that_did_not_implant_skips_the_backdoor_criteria(pytester, tiny_zoo):
    asr = _backdoored_asr(tiny_zoo)
    if asr > 99.9:
        pytest.skip(f"the tiny backdoor is perfect (ASR {asr}); no threshold in [0, 100] lies above it")
    r = _run(pytester, tiny_zoo, "OracleLineFilter", "--min-asr", f"{asr + 0.05:.2f}", "-k", "test_asr or tpr",
             "-rs", "-p", "no:cacheprovider")
    r.assert_outcomes(skipped=4)
    r.stdout.fnmatch_lines([f"SKIPPED * deeplabv3_tiny--n1-line--s0: the attack did not implant: ASR {asr:.1f}% before "
                            f"any defense < {float(f'{asr + 0.05:.2f}'):g}% (--min-asr)"])


@pytest.mark.parametrize("args, needle", [
    (["--budget-passes", "0"], "--budget-passes must be a positive whole number"),
    (["--defense-param", "factor"], "--defense-param 'factor': write it as DEFENSE.KEY=VALUE"),
    (["--defense-param", "other.k=1"], "'other' is not one of the --defense names"),
    (["--max-fpr", "2"], "--max-fpr is a fraction in [0, 1]"),
])
def test_bad_options_are_one_usage_error(pytester, tiny_zoo, args, needle):
    r = _run(pytester, tiny_zoo, "NoOp", *args, "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert needle in r.stderr.str() and "Traceback" not in r.stderr.str()


def test_defense_param_takes_the_cli_forms(pytester, tiny_zoo):
    for form in ("score=3", "mydefs:AlwaysBackdoored.score=3"):
        r = _run(pytester, tiny_zoo, "AlwaysBackdoored", "--defense-param", form, "-k", "test_verdict", "--min-asr", "0",
                 "-p", "no:cacheprovider")
        assert "says backdoored (score 3.0) on a benign entry" in r.stdout.str()



@pytest.mark.parametrize("defense, args, needle", [
    ("mydefs:AlwaysBackdoored", ["--defense-param", "scor=2"], "has no parameter 'scor' (did you mean 'score'?)"),
    ("stirp", [], "unknown defense 'stirp' (did you mean 'strip'?)"),
    ("strip", ["--defense-param", "epoch=2"], "has no parameter 'epoch'"),
])
def test_a_bad_defense_or_parameter_is_one_usage_error_and_no_test_runs(pytester, tiny_zoo, defense, args, needle):
    pytester.makepyfile(mydefs=DEFENSES)
    pytester.syspathinsert()
    r = pytester.runpytest("--pyargs", "testbed.suites", "--defense", defense, "--zoo", str(tiny_zoo), *args,
                           "-p", "no:cacheprovider")
    assert r.ret == pytest.ExitCode.USAGE_ERROR == 4
    err, out = r.stderr.str(), r.stdout.str()
    assert needle in err and defense in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [next(x for x in err.splitlines() if needle in x)]
    assert "failed" not in out and "passed" not in out and "collected" not in out


def test_junit_classnames_carry_the_defense_and_progress_stays_out_of_failures(pytester, tiny_zoo, tmp_path):
    xml = tmp_path / "junit.xml"
    r = _run(pytester, tiny_zoo, "AlwaysBackdoored", "--defense-param", "score=2.5", "-k", "test_verdict",
             "--min-asr", "0", f"--junitxml={xml}", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=1, failed=1)
    import xml.etree.ElementTree as ET

    cases = ET.parse(xml).getroot().iter("testcase")
    classnames = {c.get("classname") for c in cases}
    assert classnames and all(c.startswith("segbackdoor.always-backdoored[score=2.5].") for c in classnames), classnames
    out = r.stdout.str()
    assert "test_verdict[always-backdoored[score=2.5]:deeplabv3_tiny--benign--s0]" in out
    # the failure's captured stderr (if any) holds no scoring progress lines ("score benign: 2/2 it ...")
    assert "it/s" not in out and "s/it" not in out and "score benign:" not in out
    # neither the summary's node ids nor the progress line name a path that does not exist (../test_robustness.py)
    assert "FAILED ../" not in out and "FAILED test_robustness.py::test_verdict[" in out
    assert not [line for line in out.splitlines() if line.startswith("../")], out
    assert any(line.startswith("test_robustness.py .F") or line.startswith("test_robustness.py F.")
               for line in out.splitlines()), out


def test_pytest_without_zoo_never_imports_what_only_a_suite_run_needs(tmp_path):
    """The plugin is loaded by every pytest run where segbackdoor is installed: `pytest --help` (or any run without
    --zoo) must not import torch, the defenses or the zoo (seconds on a busy machine)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys, pytest; pytest.main(['--help']); "
            "print(sorted(m for m in ('torch', 'testbed.zoo', 'testbed.suites.session') if m in sys.modules), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "--defense-param" in r.stdout  # the plugin was loaded (its options are listed)
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
