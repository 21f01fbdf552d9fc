"""Sequence layouts: which global positions each rank of a sequence-parallel group holds.

* ``contiguous``: rank r holds block r of N equal blocks.
* ``zigzag``: the sequence is cut into 2N chunks; rank r holds chunks r and
  2N-1-r, so under a causal mask every rank does the same amount of work.
* ``stripe``: token t lives on rank t mod N (also balanced, finer grained).

A layout also knows, for ring-style attention, which parts of a query shard
attend to which parts of another rank's key shard (:meth:`Layout.ring_tasks`),
expressed with the causal-offset convention of :mod:`seqpar.kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import comm
from .errors import ConfigError, ShapeError, check
from .mesh import group_rank, group_size, resolve_group

__all__ = ["Layout", "Task", "get_layout", "shard", "unshard", "position_ids", "LAYOUTS"]


@dataclass(frozen=True)
class Task:
    """Local query rows ``q`` attend local key rows ``k`` with mask (causal, causal_offset)."""

    q: slice
    k: slice
    causal: bool
    offset: int = 0


class Layout:
    name = ""
    #: the local length must be a multiple of this many tokens per rank
    granule = 1

    def indices(self, seq_len: int, n: int, rank: int) -> torch.Tensor:
        """Global positions held by ``rank`` (LongTensor of length ``seq_len // n``), in local order."""
        raise NotImplementedError

    def ring_tasks(self, n: int, q_rank: int, kv_rank: int, local_len: int, causal: bool) -> list[Task]:
        """Attention work of ``q_rank``'s queries against ``kv_rank``'s keys (empty: nothing visible)."""
        raise NotImplementedError

    def check(self, seq_len: int, n: int) -> None:
        """Raise a ShapeError unless ``seq_len`` tokens split over ``n`` ranks in this layout."""
        need = n * self.granule
        check(seq_len % need == 0, ShapeError,
              f"sequence length {seq_len} is not divisible by {need} as layout {self.name!r} needs over {n} "
              f"ranks: pad the sequence to a multiple of {need}" + (" or use layout='contiguous'"
                                                                      if self.granule > 1 else ""))

    def permutation(self, seq_len: int, n: int) -> torch.Tensor:
        """Global position of each token of the rank-major concatenation of all shards."""
        return _permutation(self, seq_len, n)

    def __repr__(self) -> str:
        return f"<layout {self.name}>"


@lru_cache(maxsize=64)
def _permutation(layout: Layout, seq_len: int, n: int) -> torch.Tensor:
    return torch.cat([layout.indices(seq_len, n, r) for r in range(n)])


class Contiguous(Layout):
    name = "contiguous"

    def indices(self, seq_len, n, rank):
        per = seq_len // n
        return torch.arange(rank * per, (rank + 1) * per)

    def ring_tasks(self, n, q_rank, kv_rank, local_len, causal):
        if not causal or kv_rank < q_rank:
            return [Task(slice(0, local_len), slice(0, local_len), False)]
        if kv_rank == q_rank:
            return [Task(slice(0, local_len), slice(0, local_len), True)]
        return []


class Zigzag(Layout):
    name = "zigzag"
    granule = 2

    def indices(self, seq_len, n, rank):
        c = seq_len // (2 * n)
        return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                          torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])

    def ring_tasks(self, n, q_rank, kv_rank, local_len, causal):
        full, half = slice(0, local_len), local_len // 2
        if not causal:
            return [Task(full, full, False)]
        if kv_rank == q_rank:  # chunks (r, 2N-1-r) against themselves: a plain causal mask
            return [Task(full, full, True)]
        if kv_rank < q_rank:  # both query chunks see all of the earlier chunk kv_rank, none of its late chunk
            return [Task(full, slice(0, half), False)]
        # kv_rank > q_rank: only the late query chunk sees anything, and it sees both key chunks
        return [Task(slice(half, local_len), full, False)]


class Stripe(Layout):
    name = "stripe"

    def indices(self, seq_len, n, rank):
        return torch.arange(rank, seq_len, n)

    def ring_tasks(self, n, q_rank, kv_rank, local_len, causal):
        full = slice(0, local_len)
        if not causal:
            return [Task(full, full, False)]
        # query i sits at r + N*i, key j at s + N*j: visible iff j <= i (s <= r) or j <= i - 1 (s > r)
        return [Task(full, full, True, 0 if kv_rank <= q_rank else -1)]


LAYOUTS: dict[str, Layout] = {cls.name: cls() for cls in (Contiguous, Zigzag, Stripe)}


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` named ``layout`` (contiguous, zigzag or stripe)."""
    if isinstance(layout, Layout):
        return layout
    check(layout in LAYOUTS, ConfigError, f"unknown layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


class _Shard(torch.autograd.Function):
    """Take this rank's positions of a replicated tensor. Backward: gather the gradient (unshard)."""

    @staticmethod
    def forward(ctx, x, dim, layout, group):
        ctx.args = (dim, layout, group)
        n = group_size(group)
        idx = layout.indices(x.shape[dim], n, group_rank(group)).to(x.device)
        return x.index_select(dim, idx)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, group = ctx.args
        return _unshard(grad, dim, layout, group), None, None, None


def _unshard(x, dim, layout, group):
    n = group_size(group)
    if n == 1:
        return x
    full = comm.all_gather(x, dim, group)
    if layout.name == "contiguous":
        return full
    inv = torch.argsort(layout.permutation(x.shape[dim] * n, n)).to(x.device)
    return full.index_select(dim, inv)


def shard(x: torch.Tensor, dim: int = 1, *, layout: str | Layout = "zigzag", group=None, mesh=None) -> torch.Tensor:
    """This rank's part of a full (replicated) tensor along ``dim``: ``[.., S, ..] -> [.., S/N, ..]``.

    No communication forward; backward all-gathers the gradient (the dual, as in
    Megatron's scatter-to-sequence-parallel-region).
    """
    group = resolve_group(group, mesh)
    lay = get_layout(layout)
    dim = dim % x.dim()
    lay.check(x.shape[dim], group_size(group))
    if group_size(group) == 1:
        return x
    return _Shard.apply(x, dim, lay, group)


def unshard(x: torch.Tensor, dim: int = 1, *, layout: str | Layout = "zigzag", group=None, mesh=None) -> torch.Tensor:
    """The full tensor in global order from every rank's shard: ``[.., S/N, ..] -> [.., S, ..]``.

    One all-gather forward; backward reduce-scatters the gradient (as
    :func:`seqpar.comm.all_gather`), i.e. each rank's full-tensor gradient counts.
    """
    group = resolve_group(group, mesh)
    lay = get_layout(layout)
    dim = dim % x.dim()
    check(x.shape[dim] % lay.granule == 0, ShapeError,
          f"local length {x.shape[dim]} is not a multiple of {lay.granule} as layout {lay.name!r} needs")
    return _unshard(x, dim, lay, group)


def position_ids(seq_len: int, *, layout: str | Layout = "zigzag", group=None, mesh=None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``[S/N]`` of this rank's tokens (for RoPE). No communication."""
    group = resolve_group(group, mesh)
    lay = get_layout(layout)
    n = group_size(group)
    lay.check(seq_len, n)
    return lay.indices(seq_len, n, group_rank(group)).to(device)
