"""Ulysses (DeepSpeed) attention: trade the sequence split for a head split around local attention.

One all-to-all carries q, k and v together (``[B, S/N, H, D] -> [B, S, H/N, D]``),
each rank attends its heads over the whole sequence, and one all-to-all brings
the output back.  Autograd flows through the differentiable all-to-alls and
:func:`seqpar.kernels.attention_with_lse`.

GQA: kv heads are split over the ranks when ``Hkv % N == 0``; when ``Hkv < N``
and ``N % Hkv == 0`` each kv head is repeated ``N / Hkv`` times before the
all-to-all so every rank receives exactly the one kv head its query heads use
(gradients of the copies are summed by autograd through the repeat).
"""
from __future__ import annotations

import torch

from .. import comm
from ..errors import ShapeError, check
from ..kernels import attention_with_lse
from ..layout import Layout
from ..mesh import group_size

__all__ = ["ulysses_attention", "check_ulysses_heads"]


def check_ulysses_heads(heads: int, kv_heads: int, degree: int) -> None:
    """Raise a ShapeError naming the way out when heads cannot be split over ``degree`` ranks."""
    if degree == 1:
        return
    if heads % degree:
        alt = max(d for d in range(1, degree + 1) if degree % d == 0 and heads % d == 0)
        raise ShapeError(
            f"heads={heads} not divisible by ulysses degree {degree}: use strategy='usp' with ulysses={alt} "
            f"(ring over the remaining {degree // alt}), or strategy='ring'")
    check(kv_heads % degree == 0 or degree % kv_heads == 0, ShapeError,
          f"kv heads={kv_heads} neither divisible by nor dividing ulysses degree {degree}: "
          f"use strategy='usp' or strategy='ring'")


def _global_order(x: torch.Tensor, layout: Layout, n: int, inverse: bool) -> torch.Tensor:
    """Reorder dim 1 between the rank-major gathered order and global order (identity for contiguous)."""
    if layout.name == "contiguous" or n == 1:
        return x
    perm = layout.permutation(x.shape[1], n).to(x.device)
    idx = perm if inverse else torch.argsort(perm)
    return x.index_select(1, idx)


def ulysses_attention(q, k, v, *, causal: bool, scale: float, layout: Layout, group, backend: str = "auto",
                      need_lse: bool = False):
    """Ulysses attention on validated shards -> (out ``[B, S/N, H, D]``, lse ``[B, H, S/N]`` or None).

    Communication per rank: forward one all-to-all of q, k, v together and one
    of the output (plus one of the lse when ``need_lse``); backward the two
    inverse all-to-alls.
    """
    n = group_size(group)
    b, local, h, d = q.shape
    hkv = k.shape[2]
    if n > 1 and hkv < n:
        k, v = k.repeat_interleave(n // hkv, dim=2), v.repeat_interleave(n // hkv, dim=2)
        hkv = n
    # pack q, k, v so that chunk i of the head dim holds rank i's q, k and v heads: one all-to-all for all three
    packed = torch.cat([q.view(b, local, n, h // n, d), k.view(b, local, n, hkv // n, d),
                        v.view(b, local, n, hkv // n, d)], dim=3).flatten(2, 3)
    packed = comm.all_to_all(packed, scatter_dim=2, gather_dim=1, group=group)  # [B, S, (H + 2Hkv)/N, D]
    if causal:  # only a causal mask cares about token order
        packed = _global_order(packed, layout, n, inverse=False)
    ql, kl, vl = packed.split([h // n, hkv // n, hkv // n], dim=2)
    out, lse = attention_with_lse(ql, kl, vl, causal=causal, scale=scale, backend=backend)
    if causal:
        out = _global_order(out, layout, n, inverse=True)
    out = comm.all_to_all(out, scatter_dim=1, gather_dim=2, group=group)
    if not need_lse:
        return out, None
    lse = lse.transpose(1, 2)  # [B, S, H/N]
    if causal:
        lse = _global_order(lse, layout, n, inverse=True)
    return out, comm.all_to_all(lse.contiguous(), scatter_dim=1, gather_dim=2, group=group).transpose(1, 2)
