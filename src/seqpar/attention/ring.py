"""Ring attention and all-gather attention: one block loop, two ways of getting the blocks.

Both attend this rank's query shard to every rank's K/V shard, one block at a
time, accumulating (out, lse) in float32 and merging by log-sum-exp; which part
of a block is visible comes from the plan (:mod:`seqpar.attention.plans`: the
layout's closed forms, or masks from packing and windows), so blocks that are
fully masked cost nothing.  They differ only in how blocks arrive:

* ``ring``: K and V travel together as one ``[2, B, S/N, Hkv, D]`` buffer (at the
  kv-head count: GQA K/V are never repeated before communication), passed to
  the next rank N-1 times; the transfer of the next block is started before the
  current block is computed, so it overlaps with compute.  Backward is a ring
  too: K/V rotate again and their float32 gradient accumulator travels with
  them, arriving home after N hops.  Only q, k, v, out and lse are saved:
  activation memory per rank stays O(S/N).
* ``allgather``: one all-gather of K/V forward (re-gathered in backward rather
  than kept, to keep memory O(S/N)), a reduce-scatter of dK/dV backward.
"""
from __future__ import annotations

import torch

from ..core.comm import RingExchange, all_gather_tensor, reduce_scatter_tensor
from ..core.kernels import pick_backend, varlen_supported
from ..core.masks import TokenMeta
from ..core.merge import accumulation_dtype
from ..core.mesh import group_rank, group_size, resolve_group
from .blocks import backward_block, empty_accumulators, forward_block
from .cores import Core, CoreKind, run_core
from .plans import LayoutPlan, MetaPlan, Plan, cached_plan
from .registry import Strategy, register
from .spec import AttentionSpec

__all__ = ["ring_attention", "allgather_attention", "sequence_plan", "RING", "ALLGATHER"]


def _ring_forward(core: Core, q, k, v):
    order = core.plan.order(core.rank, q.device)
    if order is not None:  # every rank puts its tokens in the plan's order, so blocks arrive in it
        q, k, v = (t.index_select(1, order[0]) for t in (q, k, v))
    acc_out, acc_lse = empty_accumulators(q)
    for src, kv in RingExchange.of(core.group, core.ring_transport).rotate(torch.stack([k, v])):
        block = core.plan.block(core.rank, src, q.device, core.fused)
        if not block.empty:
            forward_block(q, kv[0], kv[1], block, acc_out, acc_lse, scale=core.scale, backend=core.backend)
    out = acc_out.to(q.dtype)
    if order is not None:
        return out.index_select(1, order[1]), acc_lse.index_select(2, order[1]), None
    return out, acc_lse, None


def _ring_backward(core: Core, dout, q, k, v, out, lse, _extra=None):
    order = core.plan.order(core.rank, q.device)
    if order is not None:
        dout, q, k, v, out = (t.index_select(1, order[0]) for t in (dout, q, k, v, out))
        lse = lse.index_select(2, order[0])
    dq, dk, dv = _ring_grads(core, dout, q, k, v, out, lse)
    if order is not None:
        return tuple(t.index_select(1, order[1]) for t in (dq, dk, dv))
    return dq, dk, dv


def _ring_grads(core: Core, dout, q, k, v, out, lse):
    ring = RingExchange.of(core.group, core.ring_transport)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    carry = ring.carry()  # dK/dV of each block travel with it and arrive home after N hops
    for src, kv in ring.rotate(torch.stack([k, v])):
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        block = core.plan.block(core.rank, src, q.device, core.fused)
        if not block.empty:
            backward_block(dout, q, kv[0], kv[1], out, lse, block, dq, dkv[0], dkv[1], scale=core.scale,
                           backend=core.backend)
        carry.add(dkv)
    dkv = carry.total()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _allgather_forward(core: Core, q, k, v):
    n, local = group_size(core.group), q.shape[1]
    kv_all = all_gather_tensor(torch.stack([k, v]), 2, core.group)  # [2, B, N*S/N, Hkv, D], rank-major
    acc_out, acc_lse = empty_accumulators(q)
    for src in range(n):
        block = core.plan.block(core.rank, src, q.device, core.fused)
        if not block.empty:
            kv = kv_all[:, :, src * local:(src + 1) * local]
            forward_block(q, kv[0], kv[1], block, acc_out, acc_lse, scale=core.scale, backend=core.backend)
    return acc_out.to(q.dtype), acc_lse, None


def _allgather_backward(core: Core, dout, q, k, v, out, lse, _extra=None):
    n, local = group_size(core.group), q.shape[1]
    kv_all = all_gather_tensor(torch.stack([k, v]), 2, core.group)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_all = torch.zeros(kv_all.shape, dtype=acc, device=q.device)
    for src in range(n):
        block = core.plan.block(core.rank, src, q.device, core.fused)
        if not block.empty:
            blk = slice(src * local, (src + 1) * local)
            kv, dkv = kv_all[:, :, blk], dkv_all[:, :, blk]
            backward_block(dout, q, kv[0], kv[1], out, lse, block, dq, dkv[0], dkv[1], scale=core.scale,
                           backend=core.backend)
    dkv = reduce_scatter_tensor(dkv_all, 2, core.group)  # float32 so the sum over ranks loses nothing
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


#: the ring's core: N-1 transfers of K/V forward; N-1 of K/V and N of the float32 dK/dV backward
RING = CoreKind("ring", _ring_forward, _ring_backward)
#: the all-gather's core: one all-gather of K/V forward; one all-gather and one reduce-scatter backward
ALLGATHER = CoreKind("allgather", _allgather_forward, _allgather_backward)


def sequence_plan(spec: AttentionSpec) -> Plan:
    """The plan of a ring or all-gather over ``spec.group``: closed forms for plain causal/full attention,
    token metadata for packing, padding and windows.  Cached."""
    if not spec.masked:
        return cached_plan(("layout", spec.layout, spec.n, spec.local, spec.causal),
                           lambda: LayoutPlan(spec.layout, spec.n, spec.local, spec.causal))

    def build() -> Plan:
        if spec.info is not None:
            metas = [spec.info.meta(r) for r in range(spec.n)]
        else:
            metas = [TokenMeta.single(spec.layout.indices(spec.local * spec.n, spec.n, r)) for r in range(spec.n)]
        return MetaPlan(metas, spec.causal, spec.window)

    return cached_plan(("meta", spec.layout, spec.n, spec.local, spec.causal, spec.window, spec.packing_key()),
                       build)


class _BlockLoop(Strategy):
    kind: CoreKind

    def prepare(self, spec: AttentionSpec) -> Core:
        return Core(self.kind, sequence_plan(spec), spec.group, spec.rank, spec.scale, spec.backend,
                    spec.ring_transport, spec.masked and spec.fused)

    def run(self, spec, core, q, k, v):
        return run_core(core, q, k, v)


@register
class RingStrategy(_BlockLoop):
    """``ring``: K/V passed around the ring, overlapped with the block computations."""

    name = "ring"
    kind = RING


@register
class AllGatherStrategy(_BlockLoop):
    """``allgather``: K/V gathered once (again in backward), dK/dV reduce-scattered."""

    name = "allgather"
    kind = ALLGATHER


def _direct(kind: CoreKind, q, k, v, plan, scale, group, backend, ring_transport):
    group = resolve_group(group)
    backend = pick_backend(q, backend)
    masked = isinstance(plan, MetaPlan)
    core = Core(kind, plan, group, group_rank(group), float(scale), backend, ring_transport,
                masked and varlen_supported(q, backend))
    return run_core(core, q, k, v)


def ring_attention(q, k, v, *, plan: Plan, scale: float, group, backend: str = "auto", ring_transport: str = "auto"):
    """Ring attention on validated shards: q ``[B, S/N, H, D]``, k/v ``[B, S/N, Hkv, D]`` -> (out, lse).

    ``plan``: a :class:`~seqpar.attention.plans.LayoutPlan` or ``MetaPlan`` for ``group``.
    Communication per rank: forward N-1 ring transfers of K/V (2*B*S/N*Hkv*D
    elements each); backward N-1 of K/V plus N of the float32 dK/dV accumulator.
    """
    return _direct(RING, q, k, v, plan, scale, group, backend, ring_transport)


def allgather_attention(q, k, v, *, plan: Plan, scale: float, group, backend: str = "auto"):
    """All-gather attention on validated shards -> (out, lse).

    Communication per rank: forward one all-gather of K/V; backward one
    all-gather of K/V and one float32 reduce-scatter of dK/dV.
    """
    return _direct(ALLGATHER, q, k, v, plan, scale, group, backend, "auto")
