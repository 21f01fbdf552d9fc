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

import torch

from ..core.comm import RingExchange
from ..core.kernels import _expand_kv, _fold_kv_grad, accumulation_dtype
from ..core.masks import TokenMeta, _visible
from ..core.mesh import group_rank, group_size

__all__ = ["ring_qk_av_attention"]


def _hidden(metas: list[TokenMeta], r: int, src: int, causal: bool, window, device) -> torch.Tensor:
    """True where a query of this rank may NOT see a key of rank ``src`` (from token metadata)."""
    return ~_visible(metas[r], metas[src], causal, window).to(device)


class _RingQKAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, metas, causal, window, scale, group, ring_transport):
        n, r = group_size(group), group_rank(group)
        b, local, h, _ = q.shape
        acc = accumulation_dtype(q.dtype)
        qa = q.to(acc)
        ring = RingExchange(group, ring_transport, resolved=True)
        scores = q.new_empty((b, h, local, n * local), dtype=acc)
        for src, kb in ring.rotate(k):  # RingQK
            s = torch.einsum("bihd,bjhd->bhij", qa, _expand_kv(kb, h).to(acc)) * scale
            if metas is not None:
                s = s.masked_fill(_hidden(metas, r, src, causal, window, q.device), float("-inf"))
            scores[..., src * local:(src + 1) * local] = s
        lse = torch.logsumexp(scores, dim=-1)
        # padding rows see nothing: lse -inf, probabilities 0 (not NaN)
        probs = torch.exp(scores - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        del scores
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        for src, vb in ring.rotate(v):  # RingAV
            out += torch.einsum("bhij,bjhd->bihd", probs[..., src * local:(src + 1) * local], _expand_kv(vb, h).to(acc))
        ctx.save_for_backward(q, k, v, probs)
        ctx.args = (scale, group, ring_transport)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, probs = ctx.saved_tensors
        scale, group, ring_transport = ctx.args
        local, h, hkv = q.shape[1], q.shape[2], k.shape[2]
        acc = probs.dtype
        do = dout.to(acc)
        ring = RingExchange(group, ring_transport, resolved=True)
        dp = torch.empty_like(probs)
        carry = ring.carry()
        for src, vb in ring.rotate(v):  # dP = dO V^T per block; dV = P^T dO travels home
            blk = slice(src * local, (src + 1) * local)
            dp[..., blk] = torch.einsum("bihd,bjhd->bhij", do, _expand_kv(vb, h).to(acc))
            carry.add(_fold_kv_grad(torch.einsum("bhij,bihd->bjhd", probs[..., blk], do), hkv).contiguous())
        dv = carry.total()
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True)) * scale
        del dp
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        qa = q.to(acc)
        carry = ring.carry()
        for src, kb in ring.rotate(k):  # dQ = dS K; dK = dS^T Q travels home
            blk = ds[..., src * local:(src + 1) * local]
            dq += torch.einsum("bhij,bjhd->bihd", blk, _expand_kv(kb, h).to(acc))
            carry.add(_fold_kv_grad(torch.einsum("bhij,bihd->bjhd", blk, qa), hkv).contiguous())
        dk = carry.total()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_qk_av_attention(q, k, v, *, metas, causal: bool, window, scale: float, group, ring_transport: str = "auto"):
    """RingQK + RingAV on validated shards -> (out ``[B, S/N, H, D]``, lse ``[B, H, S/N]``).

    Communication per rank: forward 2(N-1) ring transfers (K, then V); backward
    2(N-1) of V and K plus 2N of the float32 dV and dK accumulators.
    Memory: the ``[B, H, S/N, S]`` probabilities are kept for backward.
    ``metas[r]``: the tokens rank r holds (None: no mask at all).
    """
    return _RingQKAV.apply(q, k, v, metas, causal, window, scale, group, ring_transport)
