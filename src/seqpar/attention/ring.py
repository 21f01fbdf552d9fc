"""Ring attention and all-gather attention: one block loop, two ways of getting the blocks.

Both attend this rank's query shard to every rank's K/V shard, one block at a
time, accumulating (out, lse) in float32 and merging by log-sum-exp; which part
of a block is visible under the causal mask comes from the layout
(:meth:`seqpar.layout.Layout.ring_tasks`), so blocks that are fully masked cost
nothing.  They differ only in how blocks arrive:

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

from ..core.comm import RingExchange, _all_gather, _reduce_scatter
from ..core.kernels import accumulation_dtype, merge_into, pair_backward, pair_forward
from ..core.mesh import group_rank, group_size

__all__ = ["ring_attention", "allgather_attention"]


def _forward_block(q, kv, tasks, acc_out, acc_lse, scale, backend) -> None:
    for t in tasks:
        o, l = pair_forward(q[:, t.q], kv[0][:, t.k], kv[1][:, t.k], causal=t.causal,
                                 causal_offset=t.offset, scale=scale, backend=backend, bias=t.bias)
        merge_into(acc_out[:, t.q], acc_lse[:, :, t.q], o, l)


def _backward_block(dout, q, kv, out, lse, tasks, dq, dkv, scale, backend) -> None:
    for t in tasks:
        pair_backward(dout[:, t.q], q[:, t.q], kv[0][:, t.k], kv[1][:, t.k], out[:, t.q], lse[:, :, t.q],
                           causal=t.causal, causal_offset=t.offset, scale=scale, backend=backend,
                           grads=(dq[:, t.q], dkv[0][:, t.k], dkv[1][:, t.k]), bias=t.bias)


def _empty_acc(q: torch.Tensor):
    b, l, h, _ = q.shape
    out = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
    lse = torch.full((b, h, l), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, group, backend, ring_transport):
        r = group_rank(group)
        acc_out, acc_lse = _empty_acc(q)
        for src, kv in RingExchange(group, ring_transport, resolved=True).rotate(torch.stack([k, v])):
            _forward_block(q, kv, plan.tasks(r, src), acc_out, acc_lse, scale, backend)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.args = (plan, scale, group, backend, ring_transport)
        ctx.mark_non_differentiable(acc_lse)
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, group, backend, ring_transport = ctx.args
        r = group_rank(group)
        ring = RingExchange(group, ring_transport, resolved=True)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        carry = ring.carry()  # dK/dV of each block travel with it and arrive home after N hops
        for src, kv in ring.rotate(torch.stack([k, v])):
            dkv = torch.zeros(kv.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
            _backward_block(dout, q, kv, out, lse, plan.tasks(r, src), dq, dkv,
                            scale, backend)
            carry.add(dkv)
        dkv = carry.total()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, group, backend):
        n, r, local = group_size(group), group_rank(group), q.shape[1]
        kv_all = _all_gather(torch.stack([k, v]), 2, group)  # [2, B, N*S/N, Hkv, D], rank-major
        acc_out, acc_lse = _empty_acc(q)
        for src in range(n):
            kv = kv_all[:, :, src * local:(src + 1) * local]
            _forward_block(q, kv, plan.tasks(r, src), acc_out, acc_lse, scale, backend)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.args = (plan, scale, group, backend)
        ctx.mark_non_differentiable(acc_lse)
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, group, backend = ctx.args
        n, r, local = group_size(group), group_rank(group), q.shape[1]
        dout = dout.contiguous()
        kv_all = _all_gather(torch.stack([k, v]), 2, group)
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        for src in range(n):
            blk = slice(src * local, (src + 1) * local)
            _backward_block(dout, q, kv_all[:, :, blk], out, lse, plan.tasks(r, src),
                            dq, dkv_all[:, :, blk], scale, backend)
        dkv = _reduce_scatter(dkv_all, 2, group)  # float32 so the sum over ranks loses nothing
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, *, plan, scale: float, group, backend: str = "auto", ring_transport: str = "auto"):
    """Ring attention on validated shards: q ``[B, S/N, H, D]``, k/v ``[B, S/N, Hkv, D]`` -> (out, lse).

    Communication per rank: forward N-1 ring transfers of K/V (2*B*S/N*Hkv*D
    elements each); backward N-1 of K/V plus N of the float32 dK/dV accumulator.
    """
    return _RingAttention.apply(q, k, v, plan, scale, group, backend, ring_transport)


def allgather_attention(q, k, v, *, plan, scale: float, group, backend: str = "auto"):
    """All-gather attention on validated shards -> (out, lse).

    Communication per rank: forward one all-gather of K/V; backward one
    all-gather of K/V and one float32 reduce-scatter of dK/dV.
    """
    return _AllGatherAttention.apply(q, k, v, plan, scale, group, backend)
