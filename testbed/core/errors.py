"""The exception types a user can cause and fix, and the one "did you mean" helper.

The CLI prints a :class:`UserError`'s message on one line and exits with code 2 (no traceback).
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable


class UserError(Exception):
    """A problem in the user's input (path, flag, file, value) with a message naming the fix."""


class ParamError(UserError):
    """A bad parameter value, named the way the caller named it.

    The message is a template in which parameters appear as ``{name}`` (the Python keyword).  ``str(e)``
    spells them as keywords (library use); the CLI re-spells them as flags (``{target}`` → ``--target``)
    and a zoo spec as its TOML keys, so each front end's errors speak its own vocabulary.
    """

    _FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every ``{name}`` replaced by ``spell(name)``."""
        return self._FIELD.sub(lambda m: spell(m.group(1)), self.template)


def did_you_mean(name: object, options: Iterable[str], cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest option to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
