"""The ``seqpar`` command line: ``seqpar demo`` (more subcommands land with the planner and trainer)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqpar", description="Sequence parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
