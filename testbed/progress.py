"""Progress bars: tqdm on stderr, off when stderr is not a TTY or with --quiet."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None, **kw: Any) -> tqdm:
    """A tqdm bar that respects --quiet and TTY detection."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled(), dynamic_ncols=True, leave=False, **kw)
