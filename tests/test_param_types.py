"""Integer and number parameters of attacks, triggers and defenses follow one rule (testbed.core.paramtypes):
an integer is any numbers.Integral (numpy's included), a number any finite numbers.Real; bools are neither,
and an integral float (5.0) is refused where an integer is asked, naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.attacks import BadNets, LineTrigger, WarpTrigger
from testbed.core.errors import UserError
from testbed.core.paramtypes import is_int, is_num
from testbed.defenses.registry import load_defense

CLASSES = ["void", "road", "car"]


def test_the_rule_itself():
    assert [is_int(v) for v in (5, np.int64(5), np.uint8(5), True, np.bool_(True), 5.0, 5.5, "5")] == [
        True, True, True, False, False, False, False, False]
    assert is_int(-1, None) and not is_int(-1) and not is_int(0, 1)
    assert [is_num(v) for v in (0.5, np.float32(0.5), np.int64(3), False, float("nan"), float("inf"), "1")] == [
        True, True, True, False, False, False, False]


def test_a_defense_takes_numpy_integers_and_numbers():
    ft = load_defense("ft", epochs=np.int64(3), batch_size=np.int32(4), lr=np.float32(0.01))
    assert ft.epochs == 3 and type(ft.epochs) is np.int64  # stored as given (scikit-learn's convention)
    load_defense("strip", n_overlays=np.int64(8))


@pytest.mark.parametrize("value", [True, 5.5, 5.0])
def test_a_defense_refuses_bools_and_floats_for_an_integer_naming_it(value):
    with pytest.raises(UserError) as e:
        load_defense("ft", epochs=value)
    msg = str(e.value)
    assert "epochs must be an integer >= 0" in msg and f"got {value!r}" in msg and "\n" not in msg


def test_an_attack_and_a_trigger_take_numpy_integers():
    BadNets(top_k=np.int64(2), target_image=np.int64(0)).check_params(CLASSES)
    LineTrigger(width=np.int64(2), offset=np.int64(1), colour=np.array([255, 0, 0], np.uint8)).check((16, 16))
    WarpTrigger(grid=np.int64(4), strength=np.float32(0.5)).check((16, 16))


@pytest.mark.parametrize("value", [True, 5.5, 2.0])
def test_an_attack_refuses_bools_and_floats_for_an_integer_naming_it(value):
    with pytest.raises(UserError, match=rf"top_k must be at least 1, got {value!r}$"):
        BadNets(top_k=value).check_params(CLASSES)
    with pytest.raises(UserError, match="line_width must be a positive number of pixels"):
        LineTrigger(width=value).check((16, 16))


def test_a_seed_may_be_a_numpy_integer_and_comes_back_a_python_int():
    import numpy as np

    from testbed.core.errors import UserError
    from testbed.core.seeds import check_seed

    got = check_seed(np.int64(5))
    assert got == 5 and type(got) is int
    for bad in (True, -1, 2**63, 5.0, "5"):
        with pytest.raises(UserError, match="seed must be a whole number"):
            check_seed(bad)
