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

from functools import lru_cache

import torch

from . import comm
from .errors import ConfigError, ShapeError, check
from .masks import Task, TokenMeta, block_tasks
from .mesh import Mesh, get_mesh, group_rank, group_size, resolve_group
from .packing import SeqInfo, seq_info

__all__ = ["Layout", "Task", "Nested", "get_layout", "resolve_layout", "shard", "unshard", "position_ids",
           "LAYOUTS"]


class Layout:
    name = ""
    #: the local length must be a multiple of this many tokens per rank
    granule = 1

    def indices(self, seq_len: int, n: int, rank: int) -> torch.Tensor:
        """Global positions held by ``rank`` (LongTensor of length ``seq_len // n``), in local order."""
        raise NotImplementedError

    def ring_tasks(self, n: int, q_rank: int, kv_rank: int, local_len: int, causal: bool) -> list[Task]:
        """Attention work of ``q_rank``'s queries against ``kv_rank``'s keys (empty: nothing visible).

        Generic version from the positions each rank holds; layouts override it with closed forms.
        """
        s = local_len * n
        return block_tasks(TokenMeta.single(self.indices(s, n, q_rank)),
                           TokenMeta.single(self.indices(s, n, kv_rank)), causal)

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


class Nested(Layout):
    """The 2-D (usp) layout: ``outer`` over the ring degree, each ring shard cut contiguously over ulysses.

    Sequence-parallel rank ``g * ulysses + u`` holds piece ``u`` of ring shard ``g``,
    so the ulysses all-to-all gathers exactly ring shard ``g`` (in ``outer``'s
    local order) and the ring then runs in ``outer`` over the ring groups.
    """

    def __init__(self, outer: Layout, ring: int, ulysses: int):
        self.outer, self.ring, self.ulysses = outer, ring, ulysses
        self.name = outer.name
        self.granule = outer.granule

    def indices(self, seq_len, n, rank):
        check(n == self.ring * self.ulysses, ConfigError,
              f"the {self.name} layout of a ring={self.ring} x ulysses={self.ulysses} mesh spans "
              f"{self.ring * self.ulysses} ranks, not {n}")
        shard_ = self.outer.indices(seq_len, self.ring, rank // self.ulysses)
        return shard_.view(self.ulysses, -1)[rank % self.ulysses]

    def __eq__(self, other):
        return isinstance(other, Nested) and (other.outer, other.ring, other.ulysses) == (
            self.outer, self.ring, self.ulysses)

    def __hash__(self):
        return hash((self.outer.name, self.ring, self.ulysses))

    def __repr__(self) -> str:
        return f"<layout {self.name} over ring={self.ring}, contiguous over ulysses={self.ulysses}>"


LAYOUTS: dict[str, Layout] = {cls.name: cls() for cls in (Contiguous, Zigzag, Stripe)}


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` named ``layout`` (contiguous, zigzag or stripe)."""
    if isinstance(layout, Layout):
        return layout
    check(layout in LAYOUTS, ConfigError, f"unknown layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def resolve_layout(layout: str | Layout, group=None, mesh: Mesh | None = None) -> Layout:
    """The layout ``layout`` means on ``group``: on the sp group of a 2-D (ulysses x ring) mesh it is
    :class:`Nested`, so that shards feed ``strategy="usp"`` directly; elsewhere the plain layout."""
    lay = get_layout(layout)
    mesh = mesh if mesh is not None else get_mesh()
    if (isinstance(lay, Nested) or mesh is None or mesh.ulysses == 1 or mesh.ring == 1
            or (group is not None and group is not mesh.sp_group)):
        return lay
    return Nested(lay, mesh.ring, mesh.ulysses)


class _Shard(torch.autograd.Function):
    """Take this rank's positions of a replicated tensor. Backward: gather the gradient (unshard)."""

    @staticmethod
    def forward(ctx, x, dim, info: SeqInfo, group):
        ctx.args = (dim, info, group)
        return x.index_select(dim, info.indices(group_rank(group)).to(x.device))

    @staticmethod
    def backward(ctx, grad):
        dim, info, group = ctx.args
        return _gather_padded(grad, dim, info, group), None, None, None


def _gather_padded(x, dim, info: SeqInfo, group):
    """All-gather the shards and put them in (padded) global order."""
    full = comm._AllGather.apply(x, dim, group)  # group already resolved: None means one process
    perm = torch.cat([info.indices(r) for r in range(info.n)])
    if torch.equal(perm, torch.arange(perm.numel())):
        return full
    return full.index_select(dim, torch.argsort(perm).to(x.device))


def _info(lay: Layout, n: int, seq_len: int | None, cu_seqlens, info: SeqInfo | None, pad: bool) -> SeqInfo:
    if info is not None:
        check(info.n == n, ShapeError, f"seq_info was made for {info.n} ranks, the group has {n}")
        return info
    if cu_seqlens is not None:
        return seq_info(lay, n, cu_seqlens=cu_seqlens)
    if not pad:
        lay.check(seq_len, n)
    return seq_info(lay, n, seq_len=seq_len)


def shard(x: torch.Tensor, dim: int = 1, *, layout: str | Layout = "zigzag", group=None, mesh=None,
          cu_seqlens=None, return_info: bool = False, pad_value: float = 0):
    """This rank's part of a full (replicated) tensor along ``dim``: ``[.., S, ..] -> [.., S_padded/N, ..]``.

    With ``cu_seqlens`` (packed documents) every document is laid out over the
    ranks on its own, padded at its end to what the layout needs.  A plain
    sequence whose length the layout cannot split is padded only when
    ``return_info=True`` (otherwise a ShapeError says so): then
    ``(shard, SeqInfo)`` is returned and the :class:`~seqpar.packing.SeqInfo`
    (padding per document, positions) must be passed to
    :func:`seqpar.attention` as ``seq_info`` so padding is masked.  Padding
    holds ``pad_value`` (use -100 for labels).  No communication forward; backward all-gathers the
    gradient (the dual, as in Megatron's scatter to the sequence-parallel region).
    """
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    dim = dim % x.dim()
    n = group_size(group)
    info = _info(lay, n, x.shape[dim], cu_seqlens, None, pad=return_info)
    check(info.seq_len == x.shape[dim], ShapeError,
          f"cu_seqlens covers {info.seq_len} tokens but dim {dim} of x has {x.shape[dim]}")
    out = x if n == 1 and info.padding == 0 else _Shard.apply(info.pad(x, dim, pad_value), dim, info, group)
    return (out, info) if return_info else out


def unshard(x: torch.Tensor, dim: int = 1, *, layout: str | Layout = "zigzag", group=None, mesh=None,
            cu_seqlens=None, seq_info: SeqInfo | None = None) -> torch.Tensor:
    """The full tensor in global order from every rank's shard: ``[.., S_padded/N, ..] -> [.., S, ..]``.

    Padding (given by ``cu_seqlens`` or ``seq_info``) is removed.  One all-gather
    forward; backward reduce-scatters the gradient (as :func:`seqpar.comm.all_gather`).
    """
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    dim = dim % x.dim()
    n = group_size(group)
    check(x.shape[dim] % lay.granule == 0, ShapeError,
          f"local length {x.shape[dim]} is not a multiple of {lay.granule} as layout {lay.name!r} needs")
    info = _info(lay, n, x.shape[dim] * n, cu_seqlens, seq_info, pad=False)
    check(info.local_len == x.shape[dim], ShapeError,
          f"local length {x.shape[dim]} does not match the {info.local_len} tokens per rank of {info}")
    return info.unpad(x if n == 1 else _gather_padded(x, dim, info, group), dim)


def position_ids(seq_len: int | None = None, *, layout: str | Layout = "zigzag", group=None, mesh=None,
                 cu_seqlens=None, seq_info: SeqInfo | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Positions ``[S_padded/N]`` of this rank's tokens for RoPE; with packing they restart per document.

    No communication.
    """
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    n = group_size(group)
    info = _info(lay, n, seq_len, cu_seqlens, seq_info, pad=False)
    return info.position_ids(group_rank(group)).to(device)
