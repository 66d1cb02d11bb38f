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
    r = _run(pytester, tiny_zoo, "NoOp", "--max-asr", f"{limit}", "-k", "test_asr", "-rfp", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=1, failed=1)
    out = r.stdout.str()
    r.stdout.fnmatch_lines(["FAILED *test_asr?deeplabv3_tiny--n1-line--s0?*", "PASSED *test_asr?deeplabv3_tiny--benign--s0?*"])
    # the failure message states the measured ASR and the threshold
    assert f"{asr:.1f}%" in out and f"max {limit:g}%" in out


def test_a_defense_that_meets_the_thresholds_passes(pytester, tiny_zoo):
    r = _run(pytester, tiny_zoo, "OracleLineFilter", "--max-asr", "5", "--max-miou-drop", "1", "--budget", "600",
             "-p", "no:cacheprovider")
    # 2 entries × (asr, miou_drop, budget, deterministic) + 1 benign no-crash test
    r.assert_outcomes(passed=9)


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
