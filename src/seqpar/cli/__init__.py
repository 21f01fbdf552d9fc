"""The ``seqpar`` command line: one module per subcommand, listed in ``SUBCOMMANDS``."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


import importlib

# each module defines add_parser(subparsers) and sets func on its parser
SUBCOMMANDS = ("demo", "train", "plan", "check", "generate")


def build_parser() -> argparse.ArgumentParser:
    """The ``seqpar`` parser with every subcommand (the documentation's CLI reference reads it too)."""
    parser = argparse.ArgumentParser(prog="seqpar", description="Sequence parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
