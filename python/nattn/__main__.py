"""``python -m nattn`` / the ``nattn`` console script: dispatches the CLI subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from .cli import bench, inmodel, profile, sol

    parser = argparse.ArgumentParser(
        prog="nattn", description="nattn profiler, benchmarks and speed-of-light model")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    profile.add_parser(sub)
    bench.add_parser(sub)
    sol.add_parser(sub)
    inmodel.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; returns its exit status (0 ok, 1 regressions found by
    ``bench --compare``, 2 usage errors from argparse)."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
