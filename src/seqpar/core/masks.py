"""Attention masks from token metadata, cut into fused-kernel tasks.

A query block and a key block are described by their tokens' metadata
(:class:`TokenMeta`): the position of each token inside its document and the
document id (-1 marks padding, which neither attends nor is attended).  Query
``i`` may see key ``j`` iff both are in the same document, and, with
``causal``, ``pos_k <= pos_q``, and, with ``window=(left, right)``,
``-left <= pos_k - pos_q <= right`` (-1 = unbounded, as in flash-attn).

:func:`block_tasks` turns that mask into :class:`Task` s without building it
whole: tokens are grouped into *runs* (consecutive tokens of one document with
consecutive positions: a zigzag chunk, a packed document); a pair of runs of the
same document is one fused call with a causal offset.  Sliding windows, and
layouts whose runs are too short to pay (stripe), fall back to tiles of at most
``TILE`` query rows with an additive bias over just the visible key span, so
memory stays O(TILE x S/N) and blocks outside the window are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import Task

__all__ = ["TokenMeta", "Task", "block_tasks", "TILE"]

TILE = 128
MIN_RUN = 16  # shorter runs (stripe layouts) are cheaper as dense bias tiles than as many tiny calls



@dataclass(frozen=True)
class TokenMeta:
    """Per-token position within its document ``[L]`` and document id ``[L]`` (-1 = padding)."""

    pos: torch.Tensor
    doc: torch.Tensor

    @staticmethod
    def single(positions: torch.Tensor) -> TokenMeta:
        """Metadata of tokens that all belong to one unpadded sequence."""
        return TokenMeta(positions, torch.zeros_like(positions))

    def runs(self) -> list[tuple[int, int, int, int]]:
        """Maximal runs ``(start, end, doc, first_pos)`` of one document with consecutive positions."""
        n = self.pos.numel()
        if n == 0:
            return []
        brk = torch.ones(n, dtype=torch.bool)
        brk[1:] = (self.doc[1:] != self.doc[:-1]) | (self.pos[1:] != self.pos[:-1] + 1)
        starts = torch.nonzero(brk).flatten().tolist() + [n]
        docs, pos = self.doc.tolist(), self.pos.tolist()
        return [(s, e, docs[s], pos[s]) for s, e in zip(starts[:-1], starts[1:])]


def _bound(w: int) -> float:
    return float("inf") if w is None or w < 0 else float(w)


def _visible(qm: TokenMeta, km: TokenMeta, causal: bool, window) -> torch.Tensor:
    """Dense visibility ``[Lq, Lk]`` (only ever built for one tile of query rows)."""
    rel = km.pos.unsqueeze(0) - qm.pos.unsqueeze(1)  # pos_k - pos_q
    vis = (qm.doc.unsqueeze(1) == km.doc.unsqueeze(0)) & (qm.doc.unsqueeze(1) >= 0)
    left, right = (-1, -1) if window is None else window
    right = min(_bound(right), 0.0) if causal else _bound(right)
    vis &= rel <= right
    vis &= rel >= -_bound(left)
    return vis


def _bias_tasks(qm: TokenMeta, km: TokenMeta, causal: bool, window, q0: int, k0: int, dtype) -> list[Task]:
    """Tiles of query rows with an additive bias over the span of keys they can see."""
    tasks = []
    for a in range(0, qm.pos.numel(), TILE):
        b = min(a + TILE, qm.pos.numel())
        vis = _visible(TokenMeta(qm.pos[a:b], qm.doc[a:b]), km, causal, window)
        cols = torch.nonzero(vis.any(0)).flatten()
        if cols.numel() == 0:
            continue
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        vis = vis[:, lo:hi]
        qs, ks = slice(q0 + a, q0 + b), slice(k0 + lo, k0 + hi)
        if bool(vis.all()):
            tasks.append(Task(qs, ks, False))
        else:
            bias = torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, float("-inf"))
            tasks.append(Task(qs, ks, False, 0, bias))
    return tasks


def block_tasks(qm: TokenMeta, km: TokenMeta, causal: bool, window=None, dtype=torch.float32) -> list[Task]:
    """Fused-kernel tasks computing attention of tokens ``qm`` over tokens ``km`` under the mask."""
    q_runs, k_runs = qm.runs(), km.runs()
    short = qm.pos.numel() < MIN_RUN * len(q_runs) or km.pos.numel() < MIN_RUN * len(k_runs)
    if short:
        return _bias_tasks(qm, km, causal, window, 0, 0, dtype)
    left = -1 if window is None else window[0]
    right = -1 if window is None else window[1]
    tasks = []
    for qs, qe, qdoc, qp in q_runs:
        if qdoc < 0:
            continue
        for ks, ke, kdoc, kp in k_runs:
            if kdoc != qdoc:
                continue
            d = qp - kp  # query i (pos qp+i) sees key j (pos kp+j) causally iff j <= i + d
            lq, lk = qe - qs, ke - ks
            # relative position of the run pair spans [kp - (qp+lq-1), (kp+lk-1) - qp]
            rel_lo, rel_hi = kp - (qp + lq - 1), (kp + lk - 1) - qp
            hi = min(_bound(right), 0.0) if causal else _bound(right)
            if rel_lo > hi or rel_hi < -_bound(left):
                continue  # the whole pair lies outside the mask: skipped, no kernel call
            if rel_lo >= -_bound(left):  # only the upper edge can bind: one fused call
                if rel_hi <= hi:
                    tasks.append(Task(slice(qs, qe), slice(ks, ke), False))
                else:  # pos_k - pos_q <= hi  <=>  j <= i + d + hi
                    tasks.append(Task(slice(qs, qe), slice(ks, ke), True, d + int(hi)))
            else:  # a band: bias tiles over the visible span only
                tasks += _bias_tasks(TokenMeta(qm.pos[qs:qe], qm.doc[qs:qe]),
                                     TokenMeta(km.pos[ks:ke], km.doc[ks:ke]), causal, window, qs, ks, dtype)
    return tasks
