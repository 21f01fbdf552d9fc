"""USP (LoongTrain / yunchang's unified sequence parallelism): ulysses inside groups, a ring across them.

Sequence-parallel rank ``g * U + u`` holds piece ``u`` of ring shard ``g`` (the nested
layout of :class:`seqpar.layout.Nested`): the all-to-all inside ulysses group ``g``
gathers ring shard ``g`` for this rank's heads, and the ring over the ``R`` ring groups
then runs as plain ring attention on those shards.  With ``U = 1`` or ``R = 1`` it is
exactly ``ring`` or ``ulysses``, and runs as them.
"""
from __future__ import annotations

from typing import cast

import torch

from ..core.errors import ConfigError
from ..core.layout import Nested
from ..core.masks import TokenMeta
from ..core.mesh import Mesh
from .cores import Core, run_core
from .plans import LayoutPlan, MetaPlan, Plan, cached_plan
from .registry import Strategy, get_strategy, register
from .ring import RING
from .spec import AttentionSpec
from .ulysses import HeadExchange, token_metas

__all__ = ["UspStrategy"]


class _SortedMetaPlan(MetaPlan):
    """The ring stage's masks over each ring rank's gathered tokens put in (document, position) order.

    Ring rank g gathers sp ranks g*u .. g*u+u-1, each holding its piece of every packed document,
    so the documents come interleaved; in order, each document is one run (one fused call, one
    varlen sequence).  ``order(rank, device)``: (sort, unsort) of that rank's gathered tokens.
    """

    def __init__(self, metas: list[TokenMeta], causal: bool, window):
        sorts = []
        for m in metas:
            span = int(m.pos.max()) + 1
            key = torch.where(m.doc >= 0, m.doc * span + m.pos, torch.full_like(m.doc, (int(m.doc.max()) + 1) * span))
            sorts.append(torch.sort(key, stable=True).indices)
        super().__init__([TokenMeta(m.pos[s], m.doc[s]) for m, s in zip(metas, sorts)], causal, window)
        self.sorts: list[torch.Tensor | None] = [None if torch.equal(s, torch.arange(s.numel())) else s for s in sorts]
        self._orders: dict = {}

    def order(self, rank: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        sort = self.sorts[rank]
        if sort is None:
            return None
        key = (rank, str(device))
        if key not in self._orders:
            self._orders[key] = (sort.to(device), torch.argsort(sort).to(device))
        return self._orders[key]


def _mesh(spec: AttentionSpec) -> Mesh:
    if spec.mesh is None:  # make_spec refuses usp without a mesh; this keeps the types honest
        raise ConfigError("strategy='usp' needs a 2-D mesh: seqpar.init(sp=N, ulysses=u), or pass mesh=")
    return spec.mesh


def _ring_plan(spec: AttentionSpec) -> Plan:
    mesh = _mesh(spec)
    u, r = mesh.ulysses, mesh.ring

    def build() -> Plan:
        metas = token_metas(spec)
        if metas is None:
            return LayoutPlan(cast(Nested, spec.layout).outer, r, spec.local * u, spec.causal)
        # ring rank g holds the gathered tokens of sp ranks g*u .. g*u+u-1
        return _SortedMetaPlan([TokenMeta(torch.cat([metas[g * u + i].pos for i in range(u)]),
                                          torch.cat([metas[g * u + i].doc for i in range(u)])) for g in range(r)],
                               spec.causal, spec.window)

    return cached_plan(("usp", spec.layout, spec.n, spec.local, spec.causal, spec.window, spec.packing_key(), u, r),
                       build)


@register
class UspStrategy(Strategy):
    """``usp``: ulysses over ``mesh.ulysses_group``, then a ring over ``mesh.ring_group``."""

    name = "usp"

    def _pure(self, spec: AttentionSpec) -> Strategy | None:
        if _mesh(spec).ulysses == 1:
            return get_strategy("ring")
        if _mesh(spec).ring == 1:
            return get_strategy("ulysses")
        return None

    def prepare(self, spec: AttentionSpec) -> Core:
        pure = self._pure(spec)
        if pure is not None:  # the 1-D cases are exactly those strategies
            return pure.prepare(spec)
        mesh = _mesh(spec)
        return Core(RING, _ring_plan(spec), mesh.ring_group, mesh.rank("ring"), spec.scale, spec.backend,
                    spec.ring_transport, spec.masked and spec.fused)

    def run(self, spec, core, q, k, v):
        pure = self._pure(spec)
        if pure is not None:
            return pure.run(spec, core, q, k, v)
        ex = HeadExchange(_mesh(spec).ulysses_group, spec.heads, spec.kv_heads)
        out, lse = run_core(core, *ex.scatter_heads(q, k, v))
        return ex.gather_heads(out), (ex.gather_lse(lse) if spec.return_lse else None)
