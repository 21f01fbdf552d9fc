"""Ulysses (DeepSpeed) head exchange: trade the sequence split for a head split around attention.

One all-to-all carries q, k and v together (``[B, S/U, H, D] -> [B, S, H/U, D]``),
attention runs on whole sequences of this rank's heads, and one all-to-all
brings the output back.  Used alone (``strategy="ulysses"``) and as the inner
stage of the 2-D ``usp`` strategy.  Autograd flows through the differentiable
all-to-alls.

Heads and the degree U:

* kv heads split over the ranks when ``Hkv % U == 0``; when ``U % Hkv == 0`` each
  kv head is repeated ``U / Hkv`` times before the exchange so each rank gets the
  one kv head its query heads use (autograd sums the copies' gradients);
* otherwise (and whenever ``H % U != 0``) K/V are expanded to the query heads
  and heads are padded with zeros to a multiple of U; the padded heads' outputs
  are dropped, so their gradients never reach anything.  This costs
  (padded - H)/H more all-to-all traffic and compute, and GQA K/V travel at the
  query-head count: prefer a degree that divides the heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from ..core import comm
from ..core.kernels import pair_backward, pair_forward
from ..core.masks import TokenMeta
from ..core.merge import accumulation_dtype
from ..core.mesh import SINGLE, group_size
from .blocks import backward_block, empty_accumulators, forward_block
from .cores import Core, CoreKind, run_core
from .plans import LocalPlan, cached_plan
from .registry import Strategy, register
from .spec import AttentionSpec

__all__ = ["HeadExchange", "LOCAL", "local_core"]


@dataclass
class HeadExchange:
    """Sequence <-> head all-to-all over ``group`` for ``heads`` query and ``kv_heads`` kv heads."""

    group: object
    heads: int
    kv_heads: int

    def __post_init__(self):
        u = self.degree = group_size(self.group)
        h, hkv = self.heads, self.kv_heads
        if h % u == 0 and hkv % u == 0:
            self.kv_rep, self.padded = 1, h
        elif h % u == 0 and u % hkv == 0:
            self.kv_rep, self.padded = u // hkv, h
        else:
            self.kv_rep, self.padded = h // hkv, -(-h // u) * u

    @property
    def local_heads(self) -> int:
        return self.padded // self.degree

    def _pad(self, x: torch.Tensor, to: int) -> torch.Tensor:
        if x.shape[2] == to:
            return x
        return torch.cat([x, x.new_zeros(x.shape[:2] + (to - x.shape[2],) + x.shape[3:])], dim=2)

    def scatter_heads(self, q, k, v):
        """``[B, S/U, H, D]`` shards -> ``[B, S, H'/U, D]`` head shards (S in rank-major gathered order).

        One all-to-all for q, k and v together.
        """
        u = self.degree
        if u == 1:
            return q, k, v
        if self.kv_rep > 1:
            k, v = k.repeat_interleave(self.kv_rep, dim=2), v.repeat_interleave(self.kv_rep, dim=2)
        if self.padded != self.heads:
            q, k, v = (self._pad(t, self.padded) for t in (q, k, v))
        b, local, _, d = q.shape
        hq, hk = q.shape[2] // u, k.shape[2] // u
        # chunk i of the head dim holds rank i's q, k and v heads: one all-to-all carries all three
        packed = torch.cat([q.view(b, local, u, hq, d), k.view(b, local, u, hk, d), v.view(b, local, u, hk, d)],
                           dim=3).flatten(2, 3)
        packed = comm.all_to_all(packed, scatter_dim=2, gather_dim=1, group=self.group)
        return packed.split([hq, hk, hk], dim=2)

    def gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, S, H'/U, D]`` -> ``[B, S/U, H, D]``: one all-to-all, padding heads dropped."""
        if self.degree == 1:
            return out
        out = comm.all_to_all(out, scatter_dim=1, gather_dim=2, group=self.group)
        return out[:, :, :self.heads] if self.padded != self.heads else out

    def gather_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """``[B, H'/U, S]`` -> ``[B, H, S/U]``: one all-to-all."""
        if self.degree == 1:
            return lse
        lse = comm.all_to_all(lse.contiguous(), scatter_dim=2, gather_dim=1, group=self.group)
        return lse[:, :self.heads]


# --------------------------------------------------------------------------- attention of whole sequences


def _local_forward(core: Core, q, k, v):
    plan = cast(LocalPlan, core.plan)
    if plan.sort is not None:  # tokens in order: one causal call, or one run per document
        sort, unsort = plan.sort_indices(q.device)
        q, k, v = (t.index_select(1, sort) for t in (q, k, v))
    if plan.inner is None:
        out, lse = pair_forward(q, k, v, causal=plan.causal, causal_offset=0, scale=core.scale, backend=core.backend)
    else:
        out, lse = empty_accumulators(q)
        forward_block(q, k, v, plan.block(0, 0, q.device, core.fused), out, lse, scale=core.scale,
                      backend=core.backend)
    out = out.to(q.dtype)
    if plan.sort is not None:
        out, lse = out.index_select(1, unsort), lse.index_select(2, unsort)
    return out, lse, None


def _local_backward(core: Core, dout, q, k, v, out, lse, _extra=None):
    plan = cast(LocalPlan, core.plan)
    if plan.sort is not None:
        sort, unsort = plan.sort_indices(q.device)
        dout, q, k, v, out = (t.index_select(1, sort) for t in (dout, q, k, v, out))
        lse = lse.index_select(2, sort)
    if plan.inner is None:
        dq, dk, dv = pair_backward(dout, q, k, v, out, lse, causal=plan.causal, causal_offset=0, scale=core.scale,
                                   backend=core.backend)
    else:
        acc = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        backward_block(dout, q, k, v, out, lse, plan.block(0, 0, q.device, core.fused), dq, dk, dv,
                       scale=core.scale, backend=core.backend)
    dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if plan.sort is not None:
        dq, dk, dv = (t.index_select(1, unsort) for t in (dq, dk, dv))
    return dq, dk, dv


#: attention of whole (gathered) sequences on one rank: no communication
LOCAL = CoreKind("local", _local_forward, _local_backward)


def local_core(spec: AttentionSpec, n: int, local: int, metas: list[TokenMeta] | None) -> Core:
    """The core of the attention of whole sequences gathered from ``n`` ranks of ``local`` tokens each
    (rank-major): masks from ``metas`` (every rank's token metadata) when given, else the layout's order."""
    if metas is not None:
        plan = cached_plan(("gathered", spec.layout, n, local, spec.causal, spec.window, spec.packing_key()),
                           lambda: LocalPlan.for_metas(metas, spec.causal, spec.window))
    else:
        plan = cached_plan(("local", spec.layout, n, local, spec.causal),
                           lambda: LocalPlan.for_layout(spec.layout, n, local, spec.causal))
    return Core(LOCAL, plan, SINGLE, 0, spec.scale, spec.backend, "auto", spec.masked and spec.fused)


def token_metas(spec: AttentionSpec) -> list[TokenMeta] | None:
    """Every rank's token metadata when the mask needs it (packing, padding, a window), else None."""
    if spec.info is not None:
        return [spec.info.meta(r) for r in range(spec.n)]
    if spec.window is not None:
        return [TokenMeta.single(spec.layout.indices(spec.local * spec.n, spec.n, r)) for r in range(spec.n)]
    return None


@register
class UlyssesStrategy(Strategy):
    """``ulysses``: one all-to-all to a head split, attention of whole sequences, one all-to-all back."""

    name = "ulysses"

    def prepare(self, spec: AttentionSpec) -> Core:
        return local_core(spec, spec.n, spec.local, token_metas(spec))

    def run(self, spec, core, q, k, v):
        ex = HeadExchange(spec.group, spec.heads, spec.kv_heads)
        out, lse = run_core(core, *ex.scatter_heads(q, k, v))
        return ex.gather_heads(out), (ex.gather_lse(lse) if spec.return_lse else None)
