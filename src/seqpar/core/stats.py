"""Counters of what this rank communicates and computes, for tests and benchmarks.

``with seqpar.stats.track() as st: ...`` records every seqpar collective issued
inside the block (``st.calls[op]``, ``st.bytes[op]`` sent by this rank) and the
attention work of this rank (``st.pairs``: visible query-key pairs of its forward
kernels, ``st.kernel_calls``: how many, both read from the attention plan on the
host, never from the device) and which kernel ran each forward block
(``st.kernels["cpu_flash" | "cudnn" | "flash" | "efficient" | "flash_varlen" | "math"]``;
``math`` is the dense last resort, so a benchmark can show when it runs).
Recording costs a list check when no tracker is active, and nothing is recorded
inside a ``torch.compile`` d graph.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

__all__ = ["Stats", "track", "tracking", "record_comm", "record_work", "record_kernel", "saved_activations"]


@dataclass
class Stats:
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    pairs: int = 0
    kernel_calls: int = 0
    kernels: Counter = field(default_factory=Counter)


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


def tracking() -> bool:
    """A tracker is active (and we are not tracing a compiled graph): worth computing what to record."""
    return bool(_ACTIVE) and not torch.compiler.is_compiling()


def record_comm(op: str, nbytes: int) -> None:
    """Count one collective ``op`` sending ``nbytes`` from this rank."""
    if _ACTIVE and not torch.compiler.is_compiling():
        for st in _ACTIVE:
            st.calls[op] += 1
            st.bytes[op] += int(nbytes)


def record_work(pairs: int, calls: int = 1) -> None:
    """Count ``calls`` forward attention kernel calls attending ``pairs`` query-key pairs (host integers)."""
    if _ACTIVE and not torch.compiler.is_compiling():
        for st in _ACTIVE:
            st.pairs += int(pairs)
            st.kernel_calls += int(calls)


def record_kernel(kind: str) -> None:
    """Count one forward call of attention kernel ``kind``."""
    if _ACTIVE and not torch.compiler.is_compiling():
        for st in _ACTIVE:
            st.kernels[kind] += 1


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
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
