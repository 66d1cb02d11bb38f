"""Progress on stderr: a tqdm bar on a terminal, plain lines in a log, nothing with --quiet.

Why lines: a long command whose stderr goes to a file (CI, nohup, a cluster job) must still say where it is,
and a tqdm bar written to a file is one endless line of carriage returns.  Without a TTY, :func:`bar` returns
a :class:`LineBar` with the subset of tqdm's API the testbed uses; it prints one line when a bar closes
if it ran at least :data:`MIN_SECONDS`, or if bars of its family (the same description but for numbers: the
epochs of one training) printed nothing for that long — a line per slow epoch, one per group of fast ones, none
for a single short step — and one every :data:`INTERVAL_S` seconds while it runs (override with the environment variable
``TESTBED_PROGRESS_SECONDS``).  A line reads ``DESC: N/TOTAL UNIT (P%), 12.3 s, 8.1 UNIT/s, POSTFIX``: the
current step and the rate averaged since the bar started (not tqdm's smoothed instant rate, which swings
wildly when one step includes a checkpoint or an evaluation).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

_quiet = False
INTERVAL_S = 30.0
MIN_SECONDS = 2.0
_family_last: dict[str, float] = {}  # bar family (its description without numbers) -> when it last printed


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """An interactive bar is shown (stderr is a terminal and not --quiet)."""
    return not _quiet and sys.stderr.isatty()


def active() -> bool:
    """Progress is reported at all: a bar on a terminal, lines in a log; False only with --quiet."""
    return not _quiet


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("TESTBED_PROGRESS_SECONDS", INTERVAL_S)))
    except ValueError:
        return INTERVAL_S


class LineBar:
    """tqdm's ``update``/``set_postfix``/``set_postfix_str``/``set_description``/``write``/``close``/``n``, and
    iteration, as occasional whole lines on stderr."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
                 initial: int = 0, unit: str = "it", closing_line: bool = True, **_: Any) -> None:
        self.iterable, self.desc, self.unit = iterable, desc or "", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, int(initial), ""
        self._start = self._last = time.monotonic()
        self._closed, self._every = False, _interval()
        self._printed_at: tuple[int, str] | None = None  # (n, postfix) of the last line printed; None: none yet
        self._closing_line = closing_line  # False: the caller prints its own line when the bar ends (an epoch's)
        self.family = re.sub(r"\d+", "#", self.desc)  # "epoch 3/8" and "epoch 4/8" are one family
        _family_last.setdefault(self.family, self._start)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def line(self) -> str:
        """The line this bar would print now."""
        elapsed = time.monotonic() - self._start
        if self.unit == "%":
            where = f"{self.n}%"
        else:
            where = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
            if self.total:
                where += f" ({100 * self.n / self.total:.0f}%)"
        rate = ""
        if elapsed > 0 and self.n and self.unit != "%":  # as tqdm: seconds per unit when slower than one a second
            per_s = self.n / elapsed
            rate = f", {per_s:.3g} {self.unit}/s" if per_s >= 1 else f", {1 / per_s:.3g} s/{self.unit}"
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {where}, {elapsed:.1f} s{rate}{tail}" if self.desc else f"{where}, {elapsed:.1f} s{rate}{tail}"

    def _emit(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self._last, self._printed_at = time.monotonic(), (self.n, self.postfix)
        _family_last[self.family] = self._last

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._every and time.monotonic() - self._last >= self._every:
            self._emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    @staticmethod
    def write(msg: str, file: Any = None) -> None:
        print(msg, file=file or sys.stderr, flush=True)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """The closing line, when the bar made progress and either it ran :data:`MIN_SECONDS`, or its family
        (bars with the same description but for numbers: the epochs of one training) printed nothing for that
        long: a line per slow epoch, one per group of fast ones, none for one short step."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        moved = (self.n > 0 or bool(self.postfix)) and self._printed_at != (self.n, self.postfix)  # never twice
        if moved and self._closing_line and (self._printed_at is not None or now - self._start >= MIN_SECONDS or now - _family_last[self.family] >= MIN_SECONDS):
            self._emit()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
        closing_line: bool = True, **kw: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`LineBar` in a log, a silent bar with --quiet.

    ``closing_line=False``: in a log, no line when the bar closes (the caller writes its own summary with
    :func:`say`); the lines every :data:`INTERVAL_S` seconds while it runs remain."""
    if not _quiet and not sys.stderr.isatty():
        return LineBar(iterable, total=total, desc=desc, closing_line=closing_line, **kw)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled(), dynamic_ncols=True, leave=False, **kw)


def say(msg: str) -> None:
    """One whole line of progress on stderr: above the bars on a terminal, plain in a log, nothing with --quiet."""
    if _quiet:
        return
    if sys.stderr.isatty():
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
