"""docs/metrics.md's reconciled paired statistics: the example lines are what the code prints, and the rules the
page states (p_min = 2^(1−k) over non-zero differences, 6 models for p < 0.05) hold for the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.stats.intervals import mean_interval, sign_flip_pvalue
from testbed.stats.paired import models_needed, reconcile, smallest_p
from testbed.stats.render import difference_text

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
SECTION = PAGE[PAGE.index("**Interval and test, reconciled**"):PAGE.index("### Detection across a zoo")]


def _printed(diffs: list[float]) -> str:
    stat = mean_interval(diffs)
    p, method = sign_flip_pvalue(diffs)
    stat = {**stat, "p": p, "test": method}
    return difference_text({**stat, **reconcile(stat, diffs)}, "DER")


def test_the_examples_are_what_the_code_prints():
    lists = re.findall(r"\[([−\d., ]+)\]", SECTION.split("The lines the code prints for the DER differences")[1]
                       .split("```")[0])
    assert len(lists) == 3
    shown = SECTION.split("```")[1].strip().splitlines()
    for text, line in zip(lists, shown):
        diffs = [float(x.replace("−", "-")) for x in text.split(",")]
        assert _printed(diffs) == line


@pytest.mark.parametrize("k, expected", [(1, 1.0), (2, 0.5), (5, 0.0625), (6, 0.03125)])
def test_p_min_is_the_smallest_exact_p(k, expected):
    # independently: with k non-zero differences of one sign (and two zeros), the exact test's p is 2/2^k
    diffs = [1.0 + i for i in range(k)] + [0.0, 0.0]
    assert smallest_p(k) == expected == sign_flip_pvalue(diffs)[0]
    assert "2^(1−k)" in SECTION


def test_the_stated_number_of_models_for_p_below_005():
    assert models_needed(0.05) == 6 and "p < 0.05 needs at least 6" in SECTION
    two = _printed([-0.059, -0.065])
    assert "p=0.5" in two and "cannot go below 0.5" in two
