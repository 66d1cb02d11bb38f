"""Progress without a terminal: whole lines in a log (a line per slow epoch, per group of fast ones), nothing
with --quiet, a tqdm bar on a TTY."""

from __future__ import annotations

import io
import re

import pytest

from testbed.core import progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Captured:
    """stderr as captured by pytest (not a TTY, like a log file)."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def log(monkeypatch, capsys):
    """stderr as a log file (not a TTY), a controllable clock, progress not quiet."""
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setattr(progress, "_quiet", False)
    monkeypatch.setattr(progress, "_family_last", {})
    monkeypatch.delenv("TESTBED_PROGRESS_SECONDS", raising=False)
    return clock, Captured(capsys)


def test_a_log_gets_a_line_per_slow_epoch_with_step_and_mean_rate(log):
    clock, err = log
    bar = progress.bar(total=10, desc="epoch 1/2")
    assert isinstance(bar, progress.LineBar)
    for _ in range(10):
        clock.t += 0.5
        bar.update(1)
    bar.set_postfix(loss="0.4000", img_s="32")
    bar.close()
    bar.close()  # closing twice prints once
    (line,) = err.getvalue().splitlines()
    assert line == "epoch 1/2: 10/10 it (100%), 5.0 s, 2 it/s, loss=0.4000, img_s=32"


def test_fast_bars_print_one_line_per_group_and_long_ones_every_interval(log, monkeypatch):
    clock, err = log
    for i in range(8):  # 8 epochs of 0.6 s: a line whenever 2 s passed since the last one
        bar = progress.bar(range(3), desc=f"epoch {i + 1}/8")
        for _ in bar:
            clock.t += 0.2
    lines = err.getvalue().splitlines()
    assert [re.match(r"epoch (\d)/8", l).group(1) for l in lines] == ["4", "8"]
    monkeypatch.setenv("TESTBED_PROGRESS_SECONDS", "10")
    bar = progress.bar(total=100, desc="scoring")
    for _ in range(100):
        clock.t += 0.25
        bar.update(1)
    bar.close()
    assert [l.split(":")[1].split(",")[0].strip() for l in err.getvalue().splitlines()] == ["40/100 it (40%)", "80/100 it (80%)", "100/100 it (100%)"]


def test_a_bar_without_progress_says_nothing(log):
    clock, err = log
    bar = progress.bar(total=2, desc="score benign")  # one short step: no line, however long since the last
    clock.t += 0.5
    bar.update(2)
    bar.close()
    assert err.getvalue() == ""
    bar = progress.bar(total=100, desc="defense", unit="%")
    clock.t += 60
    bar.close()
    assert err.getvalue() == ""  # no progress reported: no line
    bar = progress.bar(total=100, desc="defense", unit="%")
    bar.update(40)
    bar.set_postfix_str("candidate 3/11")
    clock.t += 3
    bar.close()
    assert err.getvalue() == "defense: 40%, 3.0 s, candidate 3/11\n"


def test_quiet_and_tty(monkeypatch):
    monkeypatch.setattr(progress, "_quiet", True)
    assert not isinstance(progress.bar(total=3), progress.LineBar) and not progress.active()

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "_quiet", False)
    monkeypatch.setattr(progress.sys, "stderr", Tty())
    assert progress.enabled() and not isinstance(progress.bar(total=3), progress.LineBar)


def test_the_closing_line_is_never_a_repeat_and_slow_rates_read_in_seconds_per_item(log, monkeypatch):
    """A zoo of 4 entries, each 9 s: the update at 4/4 prints (interval passed), close() must not print it again;
    a rate below one item a second reads as seconds per item (36 s / 4 = 9 s/it), as tqdm writes it."""
    clock, err = log
    monkeypatch.setenv("TESTBED_PROGRESS_SECONDS", "5")
    bar = progress.bar(total=4, desc="zoo")
    for _ in range(4):
        clock.t += 9
        bar.update(1)
    bar.close()
    lines = err.getvalue().splitlines()
    assert lines[-1] == "zoo: 4/4 it (100%), 36.0 s, 9 s/it"
    assert len(lines) == len(set(lines)) == 4
