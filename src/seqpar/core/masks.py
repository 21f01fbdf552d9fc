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
memory stays O(TILE x S/N) and blocks outside the window are skipped.  That is the
CPU path.

On CUDA the same mask runs the flash op's variable-length form instead
(:func:`varlen_calls`): each query row's visible keys are one contiguous span of
the key block (within a document, every layout stores tokens in position order),
consecutive rows whose spans move as one bottom-right-aligned band become one
varlen "sequence", and the sequences of one band shape become one kernel call.

All of this runs once per batch, when the attention plan is made, on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import Task

__all__ = ["TokenMeta", "Task", "block_tasks", "TILE", "visible", "VarlenCall", "varlen_calls", "row_spans"]

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


def visible(qm: TokenMeta, km: TokenMeta, causal: bool, window) -> torch.Tensor:
    """Dense visibility ``[Lq, Lk]`` (bool) of tokens ``km`` to queries ``qm`` under the mask of this module.

    O(Lq x Lk): only ever built for one tile of query rows, a reference in tests, or ColossalAI's
    scheme (which materialises its scores anyway)."""
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
        vis = visible(TokenMeta(qm.pos[a:b], qm.doc[a:b]), km, causal, window)
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
            dead = ~vis.any(1)
            tasks.append(Task(qs, ks, False, 0, bias, dead if bool(dead.any()) else None, int(vis.sum())))
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


# --------------------------------------------------------------------------- variable-length calls (CUDA)


def _bounds(causal: bool, window) -> tuple[float, float]:
    """(how far left, how far right) of a query's position its keys may sit."""
    left, right = (-1, -1) if window is None else window
    hi = 0.0 if causal else _bound(right)
    if causal and window is not None and right >= 0:
        hi = min(float(right), 0.0)
    return _bound(left), hi


def row_spans(qm: TokenMeta, km: TokenMeta, causal: bool, window) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For every query row, the span ``[start, end)`` of key rows it sees (``start == end``: none).

    None when some row's visible keys are not one contiguous span (a layout that does not store
    a document's tokens in position order).  O((Lq + Lk) log Lk) on the host.
    """
    if km.pos.numel() == 0 or qm.pos.numel() == 0:
        return None
    span = int(torch.maximum(qm.pos.max(), km.pos.max())) + 1
    real = torch.nonzero(km.doc >= 0).flatten()
    if real.numel() == 0:  # padding only: no row sees anything
        return torch.zeros_like(qm.pos), torch.zeros_like(qm.pos)
    key = km.doc[real] * span + km.pos[real]
    key, order = torch.sort(key, stable=True)
    where = real[order]  # storage row of each key, in (document, position) order
    same_doc = key[1:] // span == key[:-1] // span
    if bool((same_doc & (where[1:] <= where[:-1])).any()):
        return None  # a document's keys are not stored in position order
    left, right = _bounds(causal, window)
    base = qm.doc * span
    lo = base + (qm.pos - left).clamp(min=0) if left != float("inf") else base
    hi = base + ((qm.pos + right).clamp(max=span - 1) if right != float("inf") else torch.full_like(qm.pos, span - 1))
    first = torch.searchsorted(key, lo, right=False)
    last = torch.searchsorted(key, hi, right=True) - 1
    count = (last - first + 1).clamp(min=0)
    count = torch.where(qm.doc >= 0, count, torch.zeros_like(count))
    live = count > 0
    start = torch.where(live, where[first.clamp(max=where.numel() - 1)], torch.zeros_like(first))
    end = torch.where(live, where[last.clamp(min=0)] + 1, torch.zeros_like(last))
    if bool((end - start != count)[live].any()):
        return None  # keys of other documents, padding or outside the window sit between a row's keys
    return start, end


@dataclass(frozen=True)
class VarlenCall:
    """One variable-length kernel call: query rows ``q_rows[i]`` attend key rows ``k_rows[i]`` (``(start, stop)``
    pairs) under the bottom-right-aligned band ``window=(left, right)`` (-1 unbounded; ``(-1, 0)`` is causal).

    Query rows of different sequences never overlap; key rows may (they are gathered).
    """

    q_rows: tuple[tuple[int, int], ...]
    k_rows: tuple[tuple[int, int], ...]
    window: tuple[int, int]
    pairs: int

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in self.q_rows)

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in self.k_rows)


def _segments(start: torch.Tensor, end: torch.Tensor) -> list[tuple[int, int]]:
    """Cut the rows into runs ``[a, b)`` over which ``start`` stays then grows by one per row and ``end``
    grows by one per row then stays: each such run is one band (flash-attn's window, bottom-right aligned)."""
    n = start.numel()
    live = end > start
    ds, de = start[1:] - start[:-1], end[1:] - end[:-1]
    ok = live[1:] & live[:-1] & (ds >= 0) & (ds <= 1) & (de >= 0) & (de <= 1)
    code = torch.where(ok, ds * 2 + de, torch.full_like(ds, 4)).tolist()
    out, seg, s_grows, e_stays = [], 0, False, False
    for j, c in enumerate(code):  # edge j joins rows j and j+1
        if c != 4:
            d_s, d_e = divmod(c, 2)
            if (d_s == 0 and not s_grows) or d_s == 1:
                if (d_e == 1 and not e_stays) or d_e == 0:
                    s_grows, e_stays = s_grows or d_s == 1, e_stays or d_e == 0
                    continue
        out.append((seg, j + 1))
        seg, s_grows, e_stays = j + 1, False, False
    out.append((seg, n))
    alive = live.tolist()
    return [(a, b) for a, b in out if alive[a]]


def _band(start: torch.Tensor, end: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(k0, k1, left, right) of one segment's rows: flash-attn's bottom-right-aligned band (-1 unbounded) in
    which row i sees keys ``[k0 + max(0, i + c - left), k0 + min(lk, i + c + right + 1))``, ``c = lk - lq``;
    None unless that reproduces every row's span exactly."""
    lq, k0, k1 = start.numel(), int(start[0]), int(end[-1])
    lk = k1 - k0
    c = lk - lq
    i = torch.arange(lq)
    left = -1 if int(start[-1]) == k0 else (lq - 1) + c - (int(start[-1]) - k0)
    right = -1 if int(end[0]) == k1 else (int(end[0]) - k0 - 1) - c
    if left < -1 or right < -1 or (left == -1 and int(start[-1]) != k0) or (right == -1 and int(end[0]) != k1):
        return None
    lo = k0 + (i + c - left).clamp(min=0) if left >= 0 else torch.full_like(i, k0)
    hi = k0 + (i + c + right + 1).clamp(max=lk) if right >= 0 else torch.full_like(i, k1)
    if not (torch.equal(lo, start) and torch.equal(hi, end)):
        return None
    return k0, k1, left, right


def varlen_calls(qm: TokenMeta, km: TokenMeta, causal: bool, window=None) -> list[VarlenCall] | None:
    """The flash varlen calls computing attention of tokens ``qm`` over ``km`` under the mask (empty: nothing
    visible, the block is skipped); None when the mask is not a set of bands (:func:`row_spans`)."""
    spans = row_spans(qm, km, causal, window)
    if spans is None:
        return None
    start, end = spans
    groups: dict[tuple[int, int], list] = {}
    for a, b in _segments(start, end):
        band = _band(start[a:b], end[a:b])
        if band is None:
            return None  # not one band (not met in the tests; the caller falls back to bias tiles)
        k0, k1, left, right = band
        entry = groups.setdefault((left, right), [[], [], 0])
        entry[0].append((a, b))
        entry[1].append((k0, k1))
        entry[2] += int((end[a:b] - start[a:b]).sum())
    return [VarlenCall(tuple(q), tuple(k), w, p) for w, (q, k, p) in groups.items()]
