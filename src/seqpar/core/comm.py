"""Differentiable collectives over a process group, and the ring exchange.

Each collective is one small autograd Function whose backward is the dual of
its forward (all-gather <-> reduce-scatter, split <-> all-gather, all-to-all
<-> the inverse all-to-all, all-reduce <-> identity), parametrised by ``dim``.
Underneath are the same collectives without autograd (``all_gather_tensor``,
``reduce_scatter_tensor``, ``split_tensor``, ``all_to_all_tensor``), for autograd
Functions that write their own backward (ring attention, the tp linears); the
gather and the reduce-scatter take ``async_op=True`` and then return a
:class:`Pending` whose :meth:`~Pending.wait` gives the result, so communication
can overlap compute.

``group=None`` means the default mesh's sequence-parallel group, resolved on entry
(:func:`seqpar.mesh.resolve_group`); :data:`seqpar.mesh.SINGLE` (one process) makes
every collective an identity.

Every call is recorded in the active :func:`seqpar.stats.track` trackers (calls
and bytes sent per rank), so tests can pin down how much each strategy sends.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, overload

import torch
import torch.distributed as dist

from .errors import ConfigError, ShapeError, check
from .mesh import group_rank, group_size, resolve_group
from .stats import record_comm

__all__ = [
    "all_gather", "reduce_scatter", "split", "all_to_all", "all_reduce", "copy_to_group",
    "all_gather_tensor", "reduce_scatter_tensor", "split_tensor", "all_to_all_tensor", "Pending",
    "RingExchange", "RingCarry", "reduce_in_place", "agreed_grads", "all_reduce_coalesced", "nbytes", "dim_index",
]


# --------------------------------------------------------------------------- raw collectives

# torch 2.13 renamed the tensor collectives; keep working on older releases (torch>=2.4)
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def nbytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``'s elements (what a collective moves per copy of it)."""
    return t.numel() * t.element_size()


def _check_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise ShapeError(f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not divisible by "
                         f"the group size {n}; pad it (seqpar.shard pads sequences) or pick a degree that divides it")


class Pending:
    """An in-flight collective; :meth:`wait` returns its result (and may be called once)."""

    def __init__(self, works, result: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._works, self._result, self._finish = works, result, finish

    def wait(self) -> torch.Tensor:
        """Block until the transfer is done (on CUDA: until the stream has it) and return the result."""
        for w in self._works:
            w.wait()
        self._works = []
        if self._finish is not None:
            self._result, self._finish = self._finish(self._result), None
        return self._result


def _done(x: torch.Tensor, async_op: bool):
    return Pending([], x) if async_op else x


@overload
def all_gather_tensor(x: torch.Tensor, dim: int, group, *, async_op: Literal[False] = False) -> torch.Tensor: ...
@overload
def all_gather_tensor(x: torch.Tensor, dim: int, group, *, async_op: Literal[True]) -> Pending: ...
def all_gather_tensor(x: torch.Tensor, dim: int, group, *, async_op: bool = False):  # noqa: E302
    """Every rank's ``x`` concatenated along ``dim`` in rank order, without autograd.

    ``[.., n, ..] -> [.., N*n, ..]``.  Communication: one all-gather of ``x``.  With
    ``async_op=True`` returns a :class:`Pending` at once.  ``group``: a process group,
    :data:`~seqpar.mesh.SINGLE`, or None (the default mesh's sp group).
    """
    if group is None:
        group = resolve_group(None)
    n = group_size(group)
    if n == 1:
        return _done(x, async_op)
    x = x.contiguous()
    # gloo wants the output as [N * d0, ...]; viewed as [N, d0, ...] it is rank-major
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    record_comm("all_gather", nbytes(x) * (n - 1))
    work = _gather_into(out, x, group=group, async_op=async_op)

    def finish(o: torch.Tensor) -> torch.Tensor:
        return o.view((n,) + tuple(x.shape)).movedim(0, dim).flatten(dim, dim + 1)
    return Pending([work], out, finish) if async_op else finish(out)


@overload
def reduce_scatter_tensor(x: torch.Tensor, dim: int, group, *, async_op: Literal[False] = False) -> torch.Tensor: ...
@overload
def reduce_scatter_tensor(x: torch.Tensor, dim: int, group, *, async_op: Literal[True]) -> Pending: ...
def reduce_scatter_tensor(x: torch.Tensor, dim: int, group, *, async_op: bool = False):  # noqa: E302
    """``x`` summed over the group, this rank's chunk along ``dim``, without autograd.

    ``[.., N*n, ..] -> [.., n, ..]``; ``x.shape[dim]`` must be divisible by N.  Communication:
    one reduce-scatter.  With ``async_op=True`` returns a :class:`Pending` at once.
    """
    if group is None:
        group = resolve_group(None)
    n = group_size(group)
    if n == 1:
        return _done(x, async_op)
    _check_divisible(x, dim, n, "reduce_scatter")
    inp = x.unflatten(dim, (n, -1)).movedim(dim, 0).contiguous()
    out = x.new_empty(inp.shape[1:])
    record_comm("reduce_scatter", nbytes(inp) * (n - 1) // n)
    # gloo: input as [N * d0, ...]; inp[i] has x's layout with dim shrunk, so the received chunk does too
    work = _reduce_scatter_into(out, inp.flatten(0, 1), group=group, async_op=async_op)
    return Pending([work], out) if async_op else out


def split_tensor(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``, without autograd.  No communication."""
    if group is None:
        group = resolve_group(None)
    n = group_size(group)
    if n == 1:
        return x
    _check_divisible(x, dim, n, "split")
    return x.chunk(n, dim)[group_rank(group)].contiguous()


def all_to_all_tensor(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Move the split of ``x`` from ``gather_dim`` to ``scatter_dim``, without autograd.

    Communication: one all-to-all moving (N-1)/N of ``x``.
    """
    if group is None:
        group = resolve_group(None)
    n = group_size(group)
    if n == 1:
        return x
    _check_divisible(x, scatter_dim, n, "all_to_all")
    inp = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    out = torch.empty_like(inp)
    record_comm("all_to_all", nbytes(inp) * (n - 1) // n)
    dist.all_to_all_single(out, inp, group=group)
    # out[i] is rank i's chunk; concatenate them along gather_dim in rank order
    return out.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    record_comm("all_reduce", nbytes(x))
    dist.all_reduce(x, group=group)
    return x


# old private names, still imported by modules outside core (models.llama); the public names above replace them
_all_gather = all_gather_tensor
_reduce_scatter = reduce_scatter_tensor
_split = split_tensor
_all_to_all = all_to_all_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def reduce_in_place(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """All-reduce ``x`` in place over ``group`` (None: the default mesh's sp group); returns ``x``.

    No autograd: for statistics (token counts, loss sums, norms, flags) that every rank needs.
    ``op``: ``"sum"``, ``"max"`` or ``"min"``.  Communication: one all-reduce of ``x``; none for one process.
    """
    group = resolve_group(group)
    if group_size(group) > 1:
        record_comm("all_reduce", nbytes(x))
        dist.all_reduce(x, op=_OPS[op], group=group)
    return x


def agreed_grads(params, group) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter that has one on *some* rank of ``group``, in the same order everywhere.

    A parameter that took part in this rank's backward but not in another's (a branch taken on some
    ranks only) gets a zero ``.grad`` where it has none, so every rank reduces the same tensors;
    parameters with no gradient anywhere keep ``None`` (the optimizer skips them, as without
    parallelism).  Communication: one all-reduce (max) of one int per parameter; none for one process.
    """
    group = resolve_group(group)
    params = [p for p in params if p.requires_grad]
    if group_size(group) > 1 and params:
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        reduce_in_place(have, group, "max")
        for p, anywhere in zip(params, have.tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None]


def all_reduce_coalesced(tensors, group, divide_by: float = 1.0) -> None:
    """Sum ``tensors`` in place over ``group`` (None: the default mesh's sp group), then divide.

    For gradients after backward: coalesced per (dtype, device) into one flat buffer,
    so one all-reduce each.  No autograd.  No communication for one process.
    """
    group = resolve_group(group)
    if group_size(group) == 1:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = reduce_in_place(torch.cat([t.reshape(-1) for t in bucket]), group)
        if divide_by != 1:
            flat.div_(divide_by)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


# --------------------------------------------------------------------------- autograd wrappers


class _AllGather(torch.autograd.Function):
    """Gather the group's chunks along dim. Backward: reduce-scatter the gradient along dim."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_tensor(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_tensor(grad, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    """Sum over the group and keep this rank's chunk along dim. Backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_tensor(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_tensor(grad, ctx.dim, ctx.group), None, None


class _Split(torch.autograd.Function):
    """Keep this rank's chunk along dim (no communication). Backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return split_tensor(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_tensor(grad, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    """Move the split from gather_dim to scatter_dim. Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all_tensor(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_tensor(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class _AllReduce(torch.autograd.Function):
    """Sum over the group. Backward: identity (each rank already holds the full gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Identity. Backward: sum the gradient over the group (the input was used by every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def dim_index(x: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index of ``x``'s dims; a ShapeError names it when out of range (no wrap-around)."""
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ShapeError(f"dim={dim!r} is out of range for a {x.dim()}-d tensor of shape {tuple(x.shape)}: "
                         f"use a dim in [{-x.dim()}, {x.dim() - 1}]")
    return dim % x.dim()


_dim = dim_index


def all_gather(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order: ``[.., n, ..] -> [.., N*n, ..]``.

    Forward: one all-gather of ``x``; backward: one reduce-scatter of the gradient.
    """
    group = resolve_group(group)
    return _AllGather.apply(x, _dim(x, dim), group)


def reduce_scatter(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """Sum ``x`` over the group and return this rank's chunk along ``dim``: ``[.., N*n, ..] -> [.., n, ..]``.

    Forward: one reduce-scatter; backward: one all-gather.  ``x.shape[dim]`` must be divisible by N.
    """
    group = resolve_group(group)
    dim = _dim(x, dim)
    if group_size(group) > 1:
        _check_divisible(x, dim, group_size(group), "reduce_scatter")
    return _ReduceScatter.apply(x, dim, group)


def split(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's contiguous chunk of a replicated ``x`` along ``dim``: ``[.., N*n, ..] -> [.., n, ..]``.

    Forward: no communication; backward: one all-gather of the gradient.
    """
    group = resolve_group(group)
    dim = _dim(x, dim)
    if group_size(group) > 1:
        _check_divisible(x, dim, group_size(group), "split")
    return _Split.apply(x, dim, group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Re-shard ``x`` from ``gather_dim`` to ``scatter_dim``.

    E.g. ``[B, S/N, H, D] -> [B, S, H/N, D]`` with ``scatter_dim=2, gather_dim=1``.
    Forward: one all-to-all moving (N-1)/N of ``x``; backward: the inverse all-to-all.
    """
    group = resolve_group(group)
    scatter_dim, gather_dim = _dim(x, scatter_dim), _dim(x, gather_dim)
    check(scatter_dim != gather_dim, ShapeError, "all_to_all needs scatter_dim != gather_dim")
    if group_size(group) > 1:
        _check_divisible(x, scatter_dim, group_size(group), "all_to_all")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the group (forward all-reduce, backward identity): Megatron's reduce-from-TP-region."""
    return _AllReduce.apply(x, resolve_group(group))


def copy_to_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward: Megatron's copy-to-TP-region."""
    return _CopyToGroup.apply(x, resolve_group(group))


# --------------------------------------------------------------------------- ring exchange


class RingExchange:
    """Send a tensor to the next rank of a group while receiving one from the previous rank.

    ``start(x)`` returns immediately with a :class:`Pending`; its ``wait()`` returns the
    tensor that arrived (same shape and dtype as ``x``), so the caller can compute
    on its current block while the next one travels.

    ``group``: a process group, :data:`~seqpar.mesh.SINGLE`, or None (the default mesh's sp group).

    Transport (``ring_transport``):

    * ``"p2p"``: ``batch_isend_irecv`` (NCCL; gloo with CPU tensors).  Asynchronous.
    * ``"alltoall"``: one ``all_to_all_single`` with every split empty except the
      one to the next rank.  gloo cannot send/recv CUDA tensors (it aborts with
      "Bad address") but does run all-to-all on them, so this is the fallback for
      several processes sharing one GPU over gloo.  Asynchronous too.
    * ``"auto"``: ``alltoall`` on gloo (required for CUDA tensors; on CPU, measured against
      PyTorch's ring on a busy 2-core machine, each gloo send blocked ~0.6 ms and the
      all-to-all transport matched or beat it in 48 of 48 cases: BENCHMARKS.md), ``p2p`` on NCCL.
    """

    def __init__(self, group=None, ring_transport: str = "auto", *, resolved: bool | None = None):
        if ring_transport not in ("auto", "p2p", "alltoall"):
            raise ConfigError(f"unknown ring_transport {ring_transport!r}: use 'auto', 'p2p' or 'alltoall'")
        if resolved is not None:
            warnings.warn("RingExchange(resolved=...) is no longer needed and goes away in the next release: "
                          "group=None always means the default mesh's sp group, seqpar.mesh.SINGLE one process",
                          DeprecationWarning, stacklevel=2)
        self.group = resolve_group(group)
        self.size = group_size(self.group)
        self.rank = group_rank(self.group)
        self.ring_transport = ring_transport
        if self.size > 1:
            self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
            self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)
            self._mode = ring_transport if ring_transport != "auto" else (
                "alltoall" if dist.get_backend(self.group) == "gloo" else "p2p")
            n = self.size
            self._to_next = [1 if i == (self.rank + 1) % n else 0 for i in range(n)]
            self._from_prev = [1 if i == (self.rank - 1) % n else 0 for i in range(n)]

    def start(self, x: torch.Tensor) -> Pending:
        """Begin sending ``x`` to rank+1 and receiving from rank-1 (ranks within the group)."""
        if self.size == 1:
            return Pending([], x)
        x = x.contiguous()
        record_comm("ring_exchange", nbytes(x))
        if self._mode == "p2p":
            recv = torch.empty_like(x)
            ops = [dist.P2POp(dist.isend, x, self.next, self.group),
                   dist.P2POp(dist.irecv, recv, self.prev, self.group)]
            works = dist.batch_isend_irecv(ops)
            # keep x alive until the send completes: it is referenced by the op list
            return Pending(works + [_KeepAlive(x)], recv)
        numel = x.numel()
        recv = x.new_empty(numel)
        work = dist.all_to_all_single(recv, x.view(-1), [numel * c for c in self._from_prev],
                                      [numel * c for c in self._to_next], group=self.group, async_op=True)
        shape = x.shape
        return Pending([work, _KeepAlive(x)], recv, finish=lambda r: r.view(shape))

    def rotate(self, x: torch.Tensor):
        """Yield ``(source_rank, block)`` for every rank's block, starting with our own ``x``.

        The transfer of the next block is started before the current one is
        yielded, so whatever the caller computes on it overlaps the transfer.
        N-1 transfers in all.
        """
        for step in range(self.size):
            pending = self.start(x) if step < self.size - 1 else None
            yield (self.rank - step) % self.size, x
            if pending is not None:
                x = pending.wait()

    def carry(self) -> RingCarry:
        """A per-block accumulator travelling with the blocks of :meth:`rotate` (see :class:`RingCarry`)."""
        return RingCarry(self)

    @staticmethod
    def of(group, ring_transport: str = "auto") -> RingExchange:
        """The (stateless, so shareable) exchange of ``group``, made once per group and transport: the
        ranks of the neighbours and the transport are looked up once, not on every ring."""
        key = (group, ring_transport)
        ring = _RINGS.get(key)
        if ring is None:
            ring = _RINGS[key] = RingExchange(group, ring_transport)
        return ring


_RINGS: dict = {}


class RingCarry:
    """Sum contributions to a block that visits every rank, delivering the total to the block's owner.

    Call :meth:`add` once per :meth:`RingExchange.rotate` step with this rank's
    contribution to the block it holds: the running sum from the previous ranks
    is added and passed on to the next rank (asynchronously, overlapping the
    next step).  After the N-th call :meth:`total` returns the sum for this
    rank's own block.  N transfers in all.
    """

    def __init__(self, ring: RingExchange):
        self.ring = ring
        self._pending: Pending | None = None

    def add(self, contribution: torch.Tensor) -> None:
        if self._pending is not None:
            contribution += self._pending.wait()
        self._pending = self.ring.start(contribution)

    def total(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("RingCarry.total() before any add(): call add() once per rotate() step")
        out, self._pending = self._pending.wait(), None
        return out


class _KeepAlive:
    """Holds a tensor referenced by an in-flight transfer until the handle is waited on."""

    def __init__(self, t: torch.Tensor):
        self.t: torch.Tensor | None = t

    def wait(self) -> None:
        self.t = None
