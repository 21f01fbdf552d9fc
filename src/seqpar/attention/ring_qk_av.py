"""ColossalAI's sequence parallelism (Li et al. 2021): RingQK then RingAV.

The reference scheme that ring attention replaced, kept for comparison: each
rank materialises its full score rows ``[B, H, S/N, S]`` (memory O(S/N * S)
per rank, against O(S/N) for :mod:`seqpar.attention.ring`).

* RingQK: K blocks rotate around the ring; each fills a column block of scores.
* softmax over the whole row (exact, no log-sum-exp merge needed).
* RingAV: V blocks rotate; ``out += P[:, :, :, block] @ V_block``.

Backward mirrors it: a ring over V gives ``dP`` while dV travels with its block,
then a ring over K gives dQ while dK travels with its block.  Scores are
computed in float32 (float64 for float64 inputs); K/V travel at the kv-head
count and are repeated for GQA only after they arrive.
"""
from __future__ import annotations

from typing import cast

import torch

from ..core.comm import RingExchange
from ..core.kernels import expand_kv, fold_kv_grad
from ..core.masks import TokenMeta
from ..core.merge import accumulation_dtype
from ..core.mesh import group_rank, group_size, resolve_group
from .cores import Core, CoreKind, run_core
from .plans import DensePlan, Plan, cached_plan
from .registry import Strategy, register
from .spec import AttentionSpec

__all__ = ["ring_qk_av_attention", "RING_QK_AV"]


def _forward(core: Core, q, k, v):
    n, r, plan, scale = group_size(core.group), core.rank, cast(DensePlan, core.plan), core.scale
    b, local, h, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    qa = q.to(acc)
    ring = RingExchange.of(core.group, core.ring_transport)
    scores = q.new_empty((b, h, local, n * local), dtype=acc)
    for src, kb in ring.rotate(k):  # RingQK
        s = torch.einsum("bihd,bjhd->bhij", qa, expand_kv(kb, h).to(acc)) * scale
        hidden = plan.hidden(r, src, q.device)
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        scores[..., src * local:(src + 1) * local] = s
    lse = torch.logsumexp(scores, dim=-1)
    # padding rows see nothing: lse -inf, probabilities 0 (not NaN)
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    del scores
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    for src, vb in ring.rotate(v):  # RingAV
        out += torch.einsum("bhij,bjhd->bihd", probs[..., src * local:(src + 1) * local], expand_kv(vb, h).to(acc))
    return out.to(q.dtype), lse, probs  # the [B, H, S/N, S] probabilities are kept for backward


def _backward(core: Core, dout, q, k, v, out, lse, probs):
    local, h, hkv, scale = q.shape[1], q.shape[2], k.shape[2], core.scale
    acc = probs.dtype
    do = dout.to(acc)
    ring = RingExchange.of(core.group, core.ring_transport)
    dp = torch.empty_like(probs)
    carry = ring.carry()
    for src, vb in ring.rotate(v):  # dP = dO V^T per block; dV = P^T dO travels home
        blk = slice(src * local, (src + 1) * local)
        dp[..., blk] = torch.einsum("bihd,bjhd->bhij", do, expand_kv(vb, h).to(acc))
        carry.add(fold_kv_grad(torch.einsum("bhij,bihd->bjhd", probs[..., blk], do), hkv).contiguous())
    dv = carry.total()
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True)) * scale
    del dp
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    qa = q.to(acc)
    carry = ring.carry()
    for src, kb in ring.rotate(k):  # dQ = dS K; dK = dS^T Q travels home
        blk = ds[..., src * local:(src + 1) * local]
        dq += torch.einsum("bhij,bjhd->bihd", blk, expand_kv(kb, h).to(acc))
        carry.add(fold_kv_grad(torch.einsum("bhij,bihd->bjhd", blk, qa), hkv).contiguous())
    dk = carry.total()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _probs_shape(core: Core, q) -> tuple[int, ...]:
    b, local, h, _ = q.shape
    return (b, h, local, group_size(core.group) * local)


#: RingQK + RingAV: forward 2(N-1) ring transfers; backward 2(N-1) of V and K plus 2N of dV and dK
RING_QK_AV = CoreKind("ring_qk_av", _forward, _backward, _probs_shape, keeps_out=False)


def _plan(spec: AttentionSpec) -> Plan:
    def build() -> Plan:
        if spec.info is not None:
            metas = [spec.info.meta(r) for r in range(spec.n)]
        elif spec.window is not None or spec.causal:
            metas = [TokenMeta.single(spec.layout.indices(spec.local * spec.n, spec.n, r)) for r in range(spec.n)]
        else:
            metas = None
        return DensePlan(metas, spec.causal, spec.window, spec.n)

    return cached_plan(("dense", spec.layout, spec.n, spec.local, spec.causal, spec.window, spec.packing_key()),
                       build)


@register
class RingQKAVStrategy(Strategy):
    """``ring_qk_av``: ColossalAI's RingQK then RingAV, scores materialised (the reference scheme)."""

    name = "ring_qk_av"

    def prepare(self, spec: AttentionSpec) -> Core:
        return Core(RING_QK_AV, _plan(spec), spec.group, spec.rank, spec.scale, spec.backend, spec.ring_transport)

    def run(self, spec, core, q, k, v):
        return run_core(core, q, k, v)


def ring_qk_av_attention(q, k, v, *, metas, causal: bool, window, scale: float, group, ring_transport: str = "auto"):
    """RingQK + RingAV on validated shards -> (out ``[B, S/N, H, D]``, lse ``[B, H, S/N]``).

    Communication per rank: forward 2(N-1) ring transfers (K, then V); backward 2(N-1)
    of V and K plus 2N of the float32 dV and dK accumulators.
    Memory: the ``[B, H, S/N, S]`` probabilities are kept for backward.
    ``metas[r]``: the tokens rank r holds (None: no mask at all).
    """
    group = resolve_group(group)
    plan = DensePlan(metas, causal, window, group_size(group))
    return run_core(Core(RING_QK_AV, plan, group, group_rank(group), float(scale), "math", ring_transport), q, k, v)
