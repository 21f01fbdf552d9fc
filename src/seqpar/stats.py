"""Counters of what this rank communicates and computes, for tests and benchmarks.

``with seqpar.stats.track() as st: ...`` records every seqpar collective issued
inside the block (``st.calls[op]``, ``st.bytes[op]`` sent by this rank) and the
attention work of this rank's kernels (``st.pairs``: visible query-key pairs in
forward kernels; ``st.kernel_calls``).  Recording costs a list check when no
tracker is active.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats", "track", "record_comm", "record_work"]


@dataclass
class Stats:
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    pairs: int = 0
    kernel_calls: int = 0


_ACTIVE: list[Stats] = []


@contextlib.contextmanager
def track():
    """Collect :class:`Stats` for the duration of the block (nested trackers all record)."""
    st = Stats()
    _ACTIVE.append(st)
    try:
        yield st
    finally:
        _ACTIVE.remove(st)


def record_comm(op: str, nbytes: int) -> None:
    for st in _ACTIVE:
        st.calls[op] += 1
        st.bytes[op] += int(nbytes)


def record_work(pairs: int) -> None:
    for st in _ACTIVE:
        st.pairs += int(pairs)
        st.kernel_calls += 1
