"""Exceptions raised by seqpar.

Every check that can fail on bad input raises one of these *before* any
collective is issued, so all ranks of a group fail the same way instead of
some of them waiting forever in a collective the others never reach.
"""
from __future__ import annotations


class SeqParError(Exception):
    """Base class of every error seqpar raises on purpose."""


class ConfigError(SeqParError, ValueError):
    """Parallel degrees, strategy or layout names that do not fit together."""


class ShapeError(SeqParError, ValueError):
    """Tensor shapes, dims or dtypes that the requested operation cannot take."""


class CommError(SeqParError, RuntimeError):
    """A collective that timed out, or a peer rank that failed."""


def check(cond: bool, exc: type[SeqParError], msg: str) -> None:
    """Raise ``exc(msg)`` when ``cond`` is false (an assert that survives ``-O``)."""
    if not cond:
        raise exc(msg)
