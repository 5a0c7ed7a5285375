"""Console output of the CLI (rich)."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    """A rich console on the current ``sys.stdout``; 200 columns wide when it is not a terminal
    (pipes, logs, captured test output), so tables are never truncated."""
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty else 200, soft_wrap=not tty)
