"""Attention plans: which work each (query rank, key rank) pair needs, built once per batch and cached.

A plan depends only on the layout, the number of ranks, the local length, the mask
(causal, window) and the packing (documents and padding), never on the tensors.  It
is made on the host the first time a layout is seen (:func:`cached_plan`) and reused
by every later call with the same values: the L layers of a step, forward and
backward, and the steps of a run with fixed shapes.  Everything the hot path needs
is in it, on the device it runs on (index tensors, bias tiles, the rows a tile hides
entirely, the cumulative lengths of varlen calls, the work counters), so attention
never reads a tensor back to the host.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.kernels import Task, mask_pieces
from ..core.layout import Layout
from ..core.masks import TokenMeta, VarlenCall, block_tasks, varlen_calls, visible

__all__ = ["Plan", "LayoutPlan", "MetaPlan", "DensePlan", "LocalPlan", "Block", "DeviceVarlen", "cached_plan",
           "clear_plans"]


@dataclass
class DeviceVarlen:
    """A :class:`~seqpar.core.masks.VarlenCall` on a device: query/key row selections (a slice when the rows
    are one contiguous range, else an index tensor) and the cumulative lengths per batch size."""

    q_index: slice | torch.Tensor
    k_index: slice | torch.Tensor
    rows_q: int
    rows_k: int
    cu_q: list[int]
    cu_k: list[int]
    max_q: int
    max_k: int
    window: tuple[int, int]
    device: torch.device
    _cu: dict = field(default_factory=dict)

    def cu(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 cumulative lengths of the ``batch`` copies of the sequences (batch folded into the token dim)."""
        hit = self._cu.get(batch)
        if hit is None:
            def expand(cu, rows):
                return torch.tensor([b * rows + c for b in range(batch) for c in cu[:-1]] + [batch * rows],
                                    dtype=torch.int32, device=self.device)
            hit = self._cu[batch] = (expand(self.cu_q, self.rows_q), expand(self.cu_k, self.rows_k))
        return hit


def _rows(ranges, device) -> tuple[slice | torch.Tensor, int, list[int]]:
    """Row selection of ``ranges`` (``(start, stop)`` pairs in order), its length and cumulative lengths."""
    cu = [0]
    for a, b in ranges:
        cu.append(cu[-1] + b - a)
    if all(b0 == a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1]), cu[-1], cu
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device), cu[-1], cu


def _device_varlen(call: VarlenCall, device) -> DeviceVarlen:
    qi, tq, cu_q = _rows(call.q_rows, device)
    ki, tk, cu_k = _rows(call.k_rows, device)
    return DeviceVarlen(qi, ki, tq, tk, cu_q, cu_k, call.max_q, call.max_k, call.window, torch.device(device))


@dataclass
class Block:
    """The work of one (query rank, key rank) pair on one device: kernel tasks (bias tiles moved to the
    device), or, for a masked block on CUDA, variable-length calls.  Neither: nothing visible, skipped."""

    tasks: list[Task]
    calls: list[DeviceVarlen] | None = None

    @property
    def empty(self) -> bool:
        return not self.tasks and not self.calls


def _on(task: Task, device) -> Task:
    if task.bias is None:
        return task
    dead = None if task.dead is None else task.dead.to(device)
    return Task(task.q, task.k, False, 0, task.bias.to(device), dead, task.visible)


class Plan:
    """Base of the plans: per-pair tasks (device independent, cached) and device blocks (cached per device)."""

    n = 1

    def __init__(self) -> None:
        self._tasks: dict[tuple[int, int], list[Task]] = {}
        self._blocks: dict[tuple, Block] = {}
        self._work: dict[tuple[int, bool], tuple[int, int]] = {}

    def _build_tasks(self, q_rank: int, kv_rank: int) -> list[Task]:
        raise NotImplementedError

    def _build_varlen(self, q_rank: int, kv_rank: int) -> list[VarlenCall] | None:
        """Variable-length calls for a masked block (None: this plan has no mask beyond the closed forms)."""
        return None

    def tasks(self, q_rank: int, kv_rank: int) -> list[Task]:
        """The kernel tasks of ``q_rank``'s queries against ``kv_rank``'s keys (empty: nothing visible)."""
        key = (q_rank, kv_rank)
        hit = self._tasks.get(key)
        if hit is None:
            hit = self._tasks[key] = self._build_tasks(q_rank, kv_rank)
        return hit

    def block(self, q_rank: int, kv_rank: int, device, fused: bool) -> Block:
        """The device-resident work of a pair; ``fused``: masked blocks may use variable-length calls."""
        key = (q_rank, kv_rank, device, fused)
        hit = self._blocks.get(key)
        if hit is None:
            calls = self._build_varlen(q_rank, kv_rank) if fused else None
            if calls is not None:
                hit = Block([], [_device_varlen(c, device) for c in calls])
            else:
                hit = Block([_on(t, device) for t in self.tasks(q_rank, kv_rank)])
            self._blocks[key] = hit
        return hit

    def order(self, rank: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sort, unsort) putting ``rank``'s tokens in the order the plan's masks are over, on ``device``; None when
        they already are (every plan but the usp ring stage over packed documents)."""
        return None

    def work(self, q_rank: int, fused: bool = False) -> tuple[int, int]:
        """(visible query-key pairs, forward kernel calls) of ``q_rank`` over every key rank: the counters of
        :mod:`seqpar.stats`, from the plan."""
        key = (q_rank, fused)
        hit = self._work.get(key)
        if hit is None:
            pairs = calls = 0
            for src in range(self.n):
                varlen = self._build_varlen(q_rank, src) if fused else None
                if varlen is not None:  # (the bias tiles of a long window are never built on this path)
                    pairs += sum(c.pairs for c in varlen)
                    calls += len(varlen)
                    continue
                tasks = self.tasks(q_rank, src)
                pairs += sum(t.pairs for t in tasks)
                calls += sum(1 if t.bias is not None else len(mask_pieces(t.q.stop - t.q.start, t.k.stop - t.k.start,
                                                                          t.causal, t.offset)) for t in tasks)
            hit = self._work[key] = (pairs, calls)
        return hit


class LayoutPlan(Plan):
    """Plain (causal or full) attention over a layout: the layout's closed-form ring tasks."""

    def __init__(self, layout: Layout, n: int, local: int, causal: bool):
        super().__init__()
        self.layout, self.n, self.local, self.causal = layout, n, local, causal

    def _build_tasks(self, q_rank, kv_rank):
        return self.layout.ring_tasks(self.n, q_rank, kv_rank, self.local, self.causal)


class MetaPlan(Plan):
    """Masks from per-token metadata (packed documents, padding, sliding windows).

    ``metas[r]`` describes the tokens rank ``r`` holds, in its local order.
    """

    def __init__(self, metas: list[TokenMeta], causal: bool, window=None):
        super().__init__()
        self.metas, self.causal, self.window, self.n = metas, causal, window, len(metas)
        self._varlen: dict[tuple[int, int], list[VarlenCall] | None] = {}

    def _build_tasks(self, q_rank, kv_rank):
        return block_tasks(self.metas[q_rank], self.metas[kv_rank], self.causal, self.window)

    def _build_varlen(self, q_rank, kv_rank):
        key = (q_rank, kv_rank)
        if key not in self._varlen:
            self._varlen[key] = varlen_calls(self.metas[q_rank], self.metas[kv_rank], self.causal, self.window)
        return self._varlen[key]


class DensePlan(Plan):
    """ColossalAI's scheme materialises its scores: the dense hidden mask per pair (None: nothing hidden)."""

    def __init__(self, metas: list[TokenMeta] | None, causal: bool, window=None, n: int = 1):
        super().__init__()
        self.metas, self.causal, self.window = metas, causal, window
        self.n = n if metas is None else len(metas)
        self._hidden: dict[tuple, torch.Tensor | None] = {}

    def _build_tasks(self, q_rank, kv_rank):
        return []

    def hidden(self, q_rank: int, kv_rank: int, device) -> torch.Tensor | None:
        """True where a query of ``q_rank`` may NOT see a key of ``kv_rank`` (``[S/N, S/N]``, on ``device``)."""
        if self.metas is None:
            return None
        key = (q_rank, kv_rank, str(device))
        if key not in self._hidden:
            self._hidden[key] = (~visible(self.metas[q_rank], self.metas[kv_rank], self.causal,
                                          self.window)).to(device)
        return self._hidden[key]


class LocalPlan(Plan):
    """Whole sequences on one rank after a head exchange (ulysses), gathered in rank-major order.

    They are put in order first (``sort``: the gathered index of each token of the ordered sequence;
    None when the gathered order already is): global position order for one plain sequence, so a
    causal mask is one fused call; (document, position) order for packed documents (padding last),
    so that every document is one run of tokens and, on CUDA, one sequence of one varlen call.
    ``inner``: the mask plan over the ordered tokens (a one-rank MetaPlan) for packing, padding and
    windows; None for plain (causal or full) attention.
    """

    def __init__(self, sort: torch.Tensor | None, length: int, causal: bool, inner: Plan | None = None):
        super().__init__()
        self.sort, self.length, self.causal, self.inner = sort, length, causal, inner
        self._index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def for_layout(layout: Layout, n: int, local: int, causal: bool) -> LocalPlan:
        perm = layout.permutation(local * n, n)  # global position of each gathered token
        ordered = not causal or n == 1 or torch.equal(perm, torch.arange(perm.numel()))
        return LocalPlan(None if ordered else torch.argsort(perm), local * n, causal)

    @staticmethod
    def for_metas(metas: list[TokenMeta], causal: bool, window) -> LocalPlan:
        pos, doc = torch.cat([m.pos for m in metas]), torch.cat([m.doc for m in metas])
        span = int(pos.max()) + 1
        key = torch.where(doc >= 0, doc * span + pos, torch.full_like(doc, (int(doc.max()) + 1) * span))
        sort = torch.sort(key, stable=True).indices
        ordered = torch.equal(sort, torch.arange(sort.numel()))
        inner = MetaPlan([TokenMeta(pos[sort], doc[sort])], causal, window)
        return LocalPlan(None if ordered else sort, pos.numel(), causal, inner)

    def _build_tasks(self, q_rank, kv_rank):
        if self.inner is not None:
            return self.inner.tasks(0, 0)
        return [Task(slice(0, self.length), slice(0, self.length), self.causal)]

    def block(self, q_rank: int, kv_rank: int, device, fused: bool) -> Block:
        return self.inner.block(0, 0, device, fused) if self.inner is not None else super().block(0, 0, device, fused)

    def work(self, q_rank: int, fused: bool = False) -> tuple[int, int]:
        return self.inner.work(0, fused) if self.inner is not None else super().work(0, fused)

    def sort_indices(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sort, unsort) on ``device``: ordered = gathered[:, sort], gathered = ordered[:, unsort]."""
        key = str(device)
        if key not in self._index:
            sort = self.sort if self.sort is not None else torch.arange(self.length)
            self._index[key] = (sort.to(device), torch.argsort(sort).to(device))
        return self._index[key]


_PLANS: OrderedDict = OrderedDict()
_CAPACITY = 64


def cached_plan(key: tuple, build: Callable[[], Plan]) -> Plan:
    """The plan for ``key`` (hashable values: kind, layout, ranks, local length, mask, packing), built by
    ``build()`` the first time and kept (least recently used first out, 64 plans)."""
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = build()
        if len(_PLANS) > _CAPACITY:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def clear_plans() -> None:
    """Forget every cached plan (tests; or to free the device copies of a finished run's masks)."""
    _PLANS.clear()
