"""Console output of the CLI (rich)."""

from __future__ import annotations

import sys

from rich.console import Console

# Width of the CLI's output where it is not a terminal (pipes, logs, captured test output), and
# the most any table takes on a terminal: every table is laid out to fit it.
WIDTH = 100
# --wide: as wide as the tables need (the old single-table layout).
WIDE = 250


def console(wide: bool = False) -> Console:
    """A rich console on the current ``sys.stdout``: at most ``WIDTH`` columns (the terminal's
    width when it is narrower), or ``WIDE`` with ``wide``."""
    if wide:
        return Console(file=sys.stdout, width=WIDE, soft_wrap=True)
    width = WIDTH
    if sys.stdout.isatty():
        width = min(WIDTH, Console(file=sys.stdout).width)
    return Console(file=sys.stdout, width=width)
