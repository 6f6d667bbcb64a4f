"""The rich consoles mltl prints tables and progress with: plain text when ``NO_COLOR`` is set or not a terminal.

rich already drops colour for ``NO_COLOR`` and writes no escape codes to a pipe, but on a terminal it
still writes bold and italic under ``NO_COLOR``; a user who sets it (or pipes into a tool that cannot read
escape codes) gets none at all here. ``FORCE_COLOR`` is left to rich.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def no_color() -> bool:
    """True when ``NO_COLOR`` is set to a non-empty value (https://no-color.org)."""
    return bool(os.environ.get("NO_COLOR"))


def make_console(*, stderr: bool = False, min_width: int | None = None, **kwargs: Any):
    """A ``rich.console.Console`` on stdout (or stderr) without any escape codes under ``NO_COLOR``.

    ``min_width`` widens a table that would otherwise wrap when the terminal (or the default 80 columns
    of a pipe) is narrower.
    """
    from rich.console import Console

    if no_color():
        kwargs.setdefault("color_system", None)  # no styles at all, not only no colours
    console = Console(stderr=stderr, file=sys.stderr if stderr else sys.stdout, **kwargs)
    if min_width is not None and console.width < min_width:
        console = Console(stderr=stderr, file=sys.stderr if stderr else sys.stdout, width=min_width, **kwargs)
    return console


__all__ = ["make_console", "no_color"]
