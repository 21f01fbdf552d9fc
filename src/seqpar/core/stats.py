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

__all__ = ["Stats", "track", "record_comm", "record_work", "saved_activations"]


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


class saved_activations:
    """Count the bytes autograd saves for backward inside the block (activation memory).

    ``with saved_activations(exclude=model.parameters()) as s: y = layer(x)`` then
    ``s.bytes``.  Each storage is counted once, however many views of it are saved;
    storages of ``exclude`` (weights, which linears save too) are not activations.
    """

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
