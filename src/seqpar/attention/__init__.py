"""``seqpar.attention``: attention over a sequence sharded across a process group.

Every strategy takes this rank's shards q ``[B, S/N, H, D]`` and k, v
``[B, S/N, Hkv, D]`` in the given sequence layout and returns this rank's
output shard ``[B, S/N, H, D]``, equal to ``scaled_dot_product_attention`` on the
unsharded tensors (forward and gradients) within the dtype's tolerance.
"""
from __future__ import annotations

import math

import torch

from ..core.debug import check_agree, check_finite, check_finite_enabled
from ..core.errors import ConfigError, ShapeError, check
from ..core.kernels import _check_qkv, attention_with_lse, pick_backend
from ..core.layout import Nested, _info, resolve_layout
from ..core.masks import TokenMeta
from ..core.mesh import Mesh, get_mesh, group_size, resolve_group
from ..core.strategies import SP_STRATEGIES
from .plans import LayoutPlan, MetaPlan
from .ring import allgather_attention, ring_attention
from .ring_qk_av import ring_qk_av_attention
from .ulysses import HeadExchange

__all__ = ["attention", "STRATEGIES"]

STRATEGIES = SP_STRATEGIES


def _check_window(window) -> tuple[int, int] | None:
    if window is None:
        return None
    check(isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) and w >= -1
                                                                          for w in window), ShapeError,
          f"window={window!r} must be (left, right) with ints >= -1 (-1 = unbounded), e.g. (4095, 0)")
    return int(window[0]), int(window[1])


def _local_attention(q, k, v, *, metas, causal, window, scale, backend, layout, n):
    """Attention of whole sequences held in rank-major gathered order (after a head exchange)."""
    if metas is not None:  # packing, padding or a window: tasks from the gathered tokens' metadata
        gathered = TokenMeta(torch.cat([m.pos for m in metas]), torch.cat([m.doc for m in metas]))
        return allgather_attention(q, k, v, plan=MetaPlan([gathered], causal, window), scale=scale, group=None,
                                   backend=backend)
    if not causal or layout.name == "contiguous" and not isinstance(layout, Nested) or n == 1:
        return attention_with_lse(q, k, v, causal=causal, scale=scale, backend=backend)
    # causal over a permuted layout: put tokens in global order for one fused causal call
    perm = layout.permutation(q.shape[1], n).to(q.device)
    inv = torch.argsort(perm)
    out, lse = attention_with_lse(*(t.index_select(1, inv) for t in (q, k, v)), causal=True, scale=scale,
                                  backend=backend)
    return out.index_select(1, perm), lse.index_select(2, perm)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, strategy: str = "ring",
              mesh: Mesh | None = None, group=None, layout: str = "zigzag", cu_seqlens=None, seq_info=None,
              scale: float | None = None, window=None, backend: str = "auto", ring_transport: str = "auto",
              return_lse: bool = False, name: str | None = None):
    """Exact attention of this rank's query shard over the whole (sharded) sequence.

    Args:
        q: ``[B, S/N, H, D]`` this rank's queries, in ``layout`` order.
        k, v: ``[B, S/N, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA).
        causal: causal mask over *global* positions.
        strategy: ``ring`` (K/V passed around the ring, overlapped), ``ulysses``
            (all-to-all to a head split), ``allgather`` (gather K/V), ``usp``
            (ulysses inside ``mesh.ulysses_group``, ring across ``mesh.ring_group``)
            or ``ring_qk_av`` (ColossalAI's RingQK/RingAV, memory O(S/N * S)).
        mesh, group: the sequence-parallel group is ``group`` if given, else
            ``mesh.sp_group``, else the default mesh's (see :func:`seqpar.init`).
            ``usp`` needs a mesh (explicit or default).
        layout: ``zigzag`` (balanced causal work), ``contiguous`` or ``stripe``;
            must match how the inputs were sharded (:func:`seqpar.shard`).
        cu_seqlens: packed documents (flash-attn varlen convention, over the
            unpadded global sequence); tokens never attend across documents.
        seq_info: the :class:`~seqpar.packing.SeqInfo` from
            ``seqpar.shard(..., return_info=True)`` (packing and padding); use
            instead of ``cu_seqlens``.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: ``(left, right)`` sliding window over positions (-1 unbounded):
            key at p' visible to query at p iff ``p - left <= p' <= p + right``.
        backend: local kernel (``auto``, ``cpu_flash``, ``cudnn``, ``flash``, ``efficient``, ``math``).
        ring_transport: ``auto``, ``p2p`` or ``alltoall`` (see :class:`seqpar.comm.RingExchange`).
        return_lse: also return the float32 log-sum-exp ``[B, H, S/N]`` of each query row.
        name: what to call this call in errors (e.g. ``"layers.3.attn"``).

    Returns:
        ``out [B, S/N, H, D]`` in q's dtype (and lse when ``return_lse``).

    Every check on the arguments runs before any communication, so a bad call
    fails with the same error on every rank instead of hanging.  With
    :func:`seqpar.set_debug` the ranks also check that they all make the same
    call (one small all-gather); with :func:`seqpar.set_check_finite` outputs and
    gradients are checked for NaN/Inf.
    """
    check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
    _check_qkv(q, k, v)
    check(q.shape[1] == k.shape[1], ShapeError,
          f"q has {q.shape[1]} local tokens but k/v have {k.shape[1]}: sequence-parallel shards must align")
    check(q.shape[1] > 0, ShapeError, "empty sequence shard: every rank needs at least one token")
    window = _check_window(window)
    check(cu_seqlens is None or seq_info is None, ShapeError, "give cu_seqlens or seq_info, not both")
    if strategy == "usp":
        mesh = mesh if mesh is not None else get_mesh()
        check(mesh is not None and group is None, ConfigError,
              "strategy='usp' needs a 2-D mesh: seqpar.init(sp=N, ulysses=u), or pass mesh=; not group=")
    group = resolve_group(group, mesh, "sp")
    n = group_size(group)
    lay = resolve_layout(layout, group, mesh)
    local = q.shape[1]
    info = None
    if cu_seqlens is not None or seq_info is not None:
        info = _info(lay, n, None, cu_seqlens, seq_info, pad=False)
        check(local == info.local_len, ShapeError,
              f"local length {local} does not match the {info.local_len} tokens per rank of {info}: "
              f"shard the inputs with seqpar.shard(..., cu_seqlens=...)")
    else:
        check(local % lay.granule == 0, ShapeError,
              f"local length {local} is odd but layout {lay.name!r} holds two chunks per rank: "
              f"use a global length divisible by {lay.granule * n}, pad with seqpar.shard(..., return_info=True), "
              f"or use layout='contiguous'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = pick_backend(q, backend)
    what = f"attention {name or ''} ({strategy})".replace("  ", " ")
    check_agree(what, group, q=q, k=k, v=v, causal=causal, layout=lay.name, window=window, scale=scale,
                docs=None if info is None else info.cu_seqlens)
    if check_finite_enabled():  # the CPU kernel silently turns a NaN query row into zeros: check inputs too
        check_finite({"q": q, "k": k, "v": v}, what, group)
    metas = None
    if info is not None:
        metas = [info.meta(r) for r in range(n)]
    elif window is not None or (strategy == "ring_qk_av" and causal):
        metas = [TokenMeta.single(lay.indices(local * n, n, r)) for r in range(n)]

    if strategy == "usp" and (mesh.ulysses == 1 or mesh.ring == 1):
        strategy = "ring" if mesh.ulysses == 1 else "ulysses"  # the 1-D cases are exactly those strategies
    if strategy in ("ring", "allgather"):
        plan = MetaPlan(metas, causal, window) if metas is not None else LayoutPlan(lay, n, local, causal)
        if strategy == "ring":
            out, lse = ring_attention(q, k, v, plan=plan, scale=scale, group=group, backend=backend,
                                      ring_transport=ring_transport)
        else:
            out, lse = allgather_attention(q, k, v, plan=plan, scale=scale, group=group, backend=backend)
    elif strategy == "ring_qk_av":
        out, lse = ring_qk_av_attention(q, k, v, metas=metas, causal=causal, window=window, scale=scale,
                                        group=group, ring_transport=ring_transport)
    elif strategy == "ulysses":
        ex = HeadExchange(group, q.shape[2], k.shape[2])
        ql, kl, vl = ex.scatter_heads(q, k, v)
        out, lse = _local_attention(ql, kl, vl, metas=metas, causal=causal, window=window, scale=scale,
                                    backend=backend, layout=lay, n=n)
        out = ex.gather_heads(out)
        lse = ex.gather_lse(lse) if return_lse else None
    else:  # usp: head exchange inside each ulysses group, then a ring over the ring groups
        u, r = mesh.ulysses, mesh.ring
        ex = HeadExchange(mesh.ulysses_group, q.shape[2], k.shape[2])
        ql, kl, vl = ex.scatter_heads(q, k, v)
        if metas is not None:  # ring rank g holds the gathered tokens of sp ranks g*u .. g*u+u-1
            ring_metas = [TokenMeta(torch.cat([metas[g * u + i].pos for i in range(u)]),
                                    torch.cat([metas[g * u + i].doc for i in range(u)])) for g in range(r)]
            plan = MetaPlan(ring_metas, causal, window)
        else:
            plan = LayoutPlan(lay.outer, r, local * u, causal)
        out, lse = ring_attention(ql, kl, vl, plan=plan, scale=scale, group=mesh.ring_group, backend=backend,
                                  ring_transport=ring_transport)
        out = ex.gather_heads(out)
        lse = ex.gather_lse(lse) if return_lse else None
    if check_finite_enabled():
        check_finite({"the output": out}, what, group)
        if out.requires_grad:  # every rank runs this hook at the same point of backward
            out.register_hook(lambda g: check_finite({"the output gradient": g}, what, group))
    return (out, lse) if return_lse else out
