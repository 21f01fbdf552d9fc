"""The ``seqpar`` command line: one module per subcommand, listed in ``SUBCOMMANDS``.

Bad input ends every subcommand the same way: one line ``seqpar COMMAND: error: ...`` on stderr
naming the problem and its fix, and exit status 2 (argparse's own status for a bad flag).  That
holds for a :class:`~seqpar.SeqParError` raised here or on any local rank of a worker pool; any
other exception is a bug and keeps its traceback.  Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# each module defines add_parser(subparsers) and sets func on its parser
SUBCOMMANDS = ("demo", "train", "plan", "check", "generate")


def _seqpar_error_names() -> set[str]:
    """Names of every SeqParError class (a worker's exception travels as its class name)."""
    import seqpar  # noqa: F401 - defines every subclass
    from seqpar.core.errors import SeqParError

    names, todo = set(), [SeqParError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a bad-input error (local or from a pool's ranks), None for anything else."""
    from seqpar.core.errors import SeqParError
    from seqpar.launch.pool import WorkerError

    if isinstance(exc, SeqParError):
        return str(exc)
    if isinstance(exc, WorkerError) and exc.failures:
        names = _seqpar_error_names()
        if all(f.type_name in names for f in exc.failures.values()):
            ranks = sorted(exc.failures)
            first = exc.failures[ranks[0]]
            same = all(f.message == first.message for f in exc.failures.values())
            where = "" if same and len(ranks) > 1 else f"rank {ranks[0]}: "
            return where + first.message
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``seqpar`` parser with every subcommand (the documentation's CLI reference reads it too)."""
    parser = argparse.ArgumentParser(prog="seqpar", description="Sequence parallelism for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"seqpar {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"seqpar {args.command}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
