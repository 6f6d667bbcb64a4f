"""The two kinds of failure mltl distinguishes.

A :class:`UserError` is a mistake the user can fix (a typo in a config, a missing folder, a bad image):
the CLI prints its one-line message and exits with status 2, without a traceback. Anything else is a bug
in mltl or a plugin and exits with status 1 and a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem in the user's input. ``str(error)`` is the whole message: where, what, and how to fix it."""


class ConfigError(UserError):
    """A problem in a config file, located by file and key path (``stages[1].freeze``)."""

    def __init__(self, message: str, *, key: str = "", source: str = "") -> None:
        self.key = key
        self.source = source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`, did you mean "x"?` for the closest choice, or the list of valid choices when none is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f', did you mean "{close[0]}"?'
    if not choices:
        return ""
    return "; valid: " + ", ".join(f'"{c}"' for c in choices)
