"""``seqpar.attention``: attention over a sequence sharded across a process group.

Every strategy takes this rank's shards q ``[B, S/N, H, D]`` and k, v
``[B, S/N, Hkv, D]`` in the given sequence layout and returns this rank's
output shard ``[B, S/N, H, D]``, equal to ``scaled_dot_product_attention`` on the
unsharded tensors (forward and gradients) within the dtype's tolerance.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError, ShapeError, check
from ..kernels import _check_qkv, pick_backend
from ..layout import get_layout
from ..mesh import Mesh, group_size, resolve_group
from .ring import allgather_attention, ring_attention
from .ring_qk_av import ring_qk_av_attention
from .ulysses import check_ulysses_heads, ulysses_attention

__all__ = ["attention", "STRATEGIES"]

STRATEGIES = ("ring", "ulysses", "allgather", "ring_qk_av")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, strategy: str = "ring",
              mesh: Mesh | None = None, group=None, layout: str = "zigzag", scale: float | None = None,
              backend: str = "auto", ring_transport: str = "auto", return_lse: bool = False):
    """Exact attention of this rank's query shard over the whole (sharded) sequence.

    Args:
        q: ``[B, S/N, H, D]`` this rank's queries, in ``layout`` order.
        k, v: ``[B, S/N, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA).
        causal: causal mask over *global* positions.
        strategy: ``ring`` (K/V passed around the ring, overlapped), ``ulysses``
            (all-to-all to a head split), ``allgather`` (gather K/V), or
            ``ring_qk_av`` (ColossalAI's RingQK/RingAV, memory O(S/N * S)).
        mesh, group: the sequence-parallel group is ``group`` if given, else
            ``mesh.sp_group``, else the default mesh's (see :func:`seqpar.init`).
        layout: ``zigzag`` (balanced causal work), ``contiguous`` or ``stripe``;
            must match how the inputs were sharded (:func:`seqpar.shard`).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: local kernel (``auto``, ``cpu_flash``, ``cudnn``, ``flash``, ``efficient``, ``math``).
        ring_transport: ``auto``, ``p2p`` or ``alltoall`` (see :class:`seqpar.comm.RingExchange`).
        return_lse: also return the float32 log-sum-exp ``[B, H, S/N]`` of each query row.

    Returns:
        ``out [B, S/N, H, D]`` in q's dtype (and lse when ``return_lse``).

    Every check on the arguments runs before any communication, so a bad call
    fails with the same error on every rank instead of hanging.
    """
    check(strategy in STRATEGIES, ConfigError,
          f"unknown strategy {strategy!r}: choose one of {STRATEGIES}" +
          (" (usp lands with the 2-D mesh)" if strategy == "usp" else ""))
    lay = get_layout(layout)
    _check_qkv(q, k, v)
    check(q.shape[1] == k.shape[1], ShapeError,
          f"q has {q.shape[1]} local tokens but k/v have {k.shape[1]}: sequence-parallel shards must align")
    check(q.shape[1] > 0, ShapeError, "empty sequence shard: every rank needs at least one token")
    check(q.shape[1] % lay.granule == 0, ShapeError,
          f"local length {q.shape[1]} is odd but layout {lay.name!r} holds two chunks per rank: "
          f"use a global length divisible by 2*N, or layout='contiguous'")
    group = resolve_group(group, mesh, "sp")
    n = group_size(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = pick_backend(q, backend)
    if strategy == "ulysses":
        check_ulysses_heads(q.shape[2], k.shape[2], n)
        out, lse = ulysses_attention(q, k, v, causal=causal, scale=scale, layout=lay, group=group, backend=backend,
                                     need_lse=return_lse)
    elif strategy == "ring":
        out, lse = ring_attention(q, k, v, causal=causal, scale=scale, layout=lay, group=group, backend=backend,
                                  mode=ring_transport)
    elif strategy == "allgather":
        out, lse = allgather_attention(q, k, v, causal=causal, scale=scale, layout=lay, group=group, backend=backend)
    else:
        out, lse = ring_qk_av_attention(q, k, v, causal=causal, scale=scale, layout=lay, group=group,
                                        mode=ring_transport)
    return (out, lse) if return_lse else out
