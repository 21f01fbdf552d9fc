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
from .packing import SeqInfo, layout_unit, seq_info

__all__ = ["Layout", "Task", "Nested", "get_layout", "resolve_layout", "shard", "unshard", "position_ids",
           "LAYOUTS", "resolve_seq_info", "sharding_of", "check_sharding", "mark_sharding", "plain_seq_info"]


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
        """Raise a ShapeError unless ``seq_len`` tokens split over ``n`` ranks in this layout (any length does
        on one process, which holds every token in order)."""
        need = 1 if n == 1 else layout_unit(self, n)
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
        if n == 1:  # one process holds every token in order (any length: nothing to split)
            return torch.arange(seq_len)
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
    found = LAYOUTS.get(layout) if isinstance(layout, str) else None
    if found is None:
        raise ConfigError(f"unknown layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    return found


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
        return x.index_select(dim, info.on(f"indices:{group_rank(group)}", x.device))

    @staticmethod
    def backward(ctx, grad):
        dim, info, group = ctx.args
        return _gather_padded(grad, dim, info, group), None, None, None


class _GatherReplicated(torch.autograd.Function):
    """Unshard for a consumer every rank computes alike: backward keeps this rank's positions of the
    (whole, replicated) gradient instead of summing the ranks' copies."""

    @staticmethod
    def forward(ctx, x, dim, info: SeqInfo, group):
        ctx.args = (dim, info, group)
        with torch.no_grad():
            return _gather_padded(x, dim, info, group)

    @staticmethod
    def backward(ctx, grad):
        dim, info, group = ctx.args
        return grad.index_select(dim, info.on(f"indices:{group_rank(group)}", grad.device)), None, None, None


def _gather_padded(x, dim, info: SeqInfo, group):
    """All-gather the shards and put them in (padded) global order."""
    full = comm.all_gather(x, dim, group)
    order = info.on("gather_order", x.device)
    return full if order is None else full.index_select(dim, order)


def resolve_seq_info(lay: Layout, n: int, seq_len: int | None, cu_seqlens=None, info: SeqInfo | None = None,
                     pad: bool = False) -> SeqInfo:
    """The :class:`~seqpar.packing.SeqInfo` a call means: ``info`` if given (checked against ``n``), else
    the packing of ``cu_seqlens``, else a plain sequence of ``seq_len`` tokens (which, unless ``pad``,
    must split over ``n`` ranks in ``lay`` without padding).  No communication."""
    if info is not None:
        check(info.n == n, ShapeError, f"seq_info was made for {info.n} ranks, the group has {n}")
        return info
    if cu_seqlens is not None:
        return seq_info(lay, n, cu_seqlens=cu_seqlens)
    if seq_len is None:
        raise ShapeError("give seq_len, cu_seqlens or seq_info: the sequence's length is needed to place its tokens")
    if not pad:
        lay.check(seq_len, n)
        return seq_info(lay, n, seq_len=seq_len, exact=True)
    return seq_info(lay, n, seq_len=seq_len)


_SHARDING = "_seqpar_sharding"


def sharding_of(x: torch.Tensor) -> SeqInfo | None:
    """How :func:`shard` split ``x`` (its :class:`~seqpar.packing.SeqInfo`: layout, ranks, packing,
    padding), or None for a tensor that did not come out of :func:`shard` (or came from one process)."""
    return getattr(x, _SHARDING, None)


def check_sharding(x: torch.Tensor, expected: SeqInfo, what: str, call: str) -> None:
    """Raise a ShapeError unless ``x`` (if it came from :func:`shard`) was split as ``expected``.

    ``what`` names the tensor, ``call`` the function checking it.  Costs an attribute read when
    the splits are one object (the usual case: every call of a step shares its SeqInfo).  A
    shard laid out one way and attended another gives wrong results without any other error,
    so this runs always, not only in debug mode.  No communication: every rank has the same
    SeqInfos, so every rank raises alike.
    """
    got = sharding_of(x)
    if got is None or got is expected or got.same_split(expected):
        return
    hint = ("pass the same layout to both" if got.layout != expected.layout or got.n != expected.n else
            "pass the same cu_seqlens (or the seq_info that shard returned) to both")
    raise ShapeError(f"{what} was sharded with {got.describe()}, but {call} was called for "
                     f"{expected.describe()}: its tokens are not where {call} expects them; {hint}")


def _mark(out: torch.Tensor, info: SeqInfo) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # an attribute on a tensor is invisible to a compiled graph
        setattr(out, _SHARDING, info)
    return out


def plain_seq_info(layout: Layout, n: int, local: int) -> SeqInfo:
    """The SeqInfo of one unpadded sequence of ``local`` tokens per rank over ``n`` ranks (cached)."""
    key = (layout, n, local)
    hit = _PLAIN.get(key)
    if hit is None:
        hit = _PLAIN[key] = seq_info(layout, n, seq_len=local * n, exact=True)
    return hit


_PLAIN: dict = {}


def mark_sharding(x: torch.Tensor, info: SeqInfo | None, layout: Layout, n: int, local: int) -> torch.Tensor:
    """Record on ``x`` (a shard of ``local`` tokens per rank over ``n`` ranks) how it is split: ``info``, or one
    plain sequence in ``layout`` when None, so that :func:`unshard` and :func:`seqpar.attention` can check it.
    Nothing is recorded for one process (every split is the identity there).  Returns ``x``."""
    if n > 1:
        _mark(x, info if info is not None else plain_seq_info(layout, n, local))
    return x


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
    holds ``pad_value`` (use -100 for labels).  The shard remembers how it was
    split (:func:`sharding_of`): :func:`seqpar.attention` and :func:`unshard` given
    it with another layout or packing raise instead of computing on misplaced
    tokens.  No communication forward; backward all-gathers the gradient (the
    dual, as in Megatron's scatter to the sequence-parallel region).
    """
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    dim = comm.dim_index(x, dim)
    n = group_size(group)
    info = resolve_seq_info(lay, n, x.shape[dim], cu_seqlens, None, pad=return_info)
    check(info.seq_len == x.shape[dim], ShapeError,
          f"cu_seqlens covers {info.seq_len} tokens but dim {dim} of x has {x.shape[dim]}")
    if n == 1 and info.padding == 0:
        out = x
    else:
        out = _mark(_Shard.apply(info.pad(x, dim, pad_value), dim, info, group), info)
    return (out, info) if return_info else out


def unshard(x: torch.Tensor, dim: int = 1, *, layout: str | Layout = "zigzag", group=None, mesh=None,
            cu_seqlens=None, seq_info: SeqInfo | None = None, grad: str = "sum") -> torch.Tensor:
    """The full tensor in global order from every rank's shard: ``[.., S_padded/N, ..] -> [.., S, ..]``.

    Padding (given by ``cu_seqlens`` or ``seq_info``) is removed.  One all-gather forward.

    The result is replicated: every rank holds the same tensor.  Its backward depends on what
    consumes it (``grad``):

    * ``"sum"`` (default, the dual of the all-gather, as :func:`seqpar.comm.all_gather`): the
      ranks' gradients are summed and each rank keeps its part.  Right when each rank's
      consumer contributes its own share of the objective.  A loss computed on the unsharded
      tensor *on every rank* counts N times: its gradients come out N times too large.
    * ``"replicated"``: the consumer is the same on every rank (e.g. a loss on the whole
      output computed by every rank), so each rank keeps its own positions of that one
      gradient: exactly the single-device gradient.

    For training, compute the loss on the shards instead (:func:`seqpar.train.causal_lm_loss`
    reduces over the sp group itself) and unshard only to inspect results.
    Communication: one all-gather forward; backward one reduce-scatter (``"sum"``) or none.
    """
    check(grad in ("sum", "replicated"), ConfigError,
          f"grad={grad!r}: use 'sum' (each rank's consumer is its own share) or 'replicated' (every rank "
          f"computes the same loss on the unsharded tensor)")
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    dim = comm.dim_index(x, dim)
    n = group_size(group)
    if n > 1:
        check(x.shape[dim] % lay.granule == 0, ShapeError,
              f"local length {x.shape[dim]} is not a multiple of {lay.granule} as layout {lay.name!r} needs")
    info = resolve_seq_info(lay, n, x.shape[dim] * n, cu_seqlens, seq_info, pad=False)
    check(info.local_len == x.shape[dim], ShapeError,
          f"local length {x.shape[dim]} does not match the {info.local_len} tokens per rank of {info}")
    check_sharding(x, info, "the tensor", "unshard")
    if n == 1:
        return info.unpad(x, dim)
    full = (_gather_padded(x, dim, info, group) if grad == "sum"
            else _GatherReplicated.apply(x, dim, info, group))
    return info.unpad(full, dim)


def position_ids(seq_len: int | None = None, *, layout: str | Layout = "zigzag", group=None, mesh=None,
                 cu_seqlens=None, seq_info: SeqInfo | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Positions ``[S_padded/N]`` of this rank's tokens for RoPE; with packing they restart per document.

    No communication.
    """
    group = resolve_group(group, mesh)
    lay = resolve_layout(layout, group, mesh)
    n = group_size(group)
    info = resolve_seq_info(lay, n, seq_len, cu_seqlens, seq_info, pad=False)
    return info.position_ids(group_rank(group)).to(device)
