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

import torch

from ..core import comm
from ..core.mesh import group_size

__all__ = ["HeadExchange"]


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
