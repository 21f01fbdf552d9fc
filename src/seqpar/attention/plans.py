"""Which attention work each (query rank, key rank) pair needs: closed-form or from token metadata."""
from __future__ import annotations

from ..core.layout import Layout
from ..core.masks import Task, TokenMeta, block_tasks

__all__ = ["LayoutPlan", "MetaPlan"]


class LayoutPlan:
    """Plain (causal or full) attention over a layout: the layout's closed-form ring tasks."""

    def __init__(self, layout: Layout, n: int, local: int, causal: bool):
        self.layout, self.n, self.local, self.causal = layout, n, local, causal

    def tasks(self, q_rank: int, kv_rank: int) -> list[Task]:
        return self.layout.ring_tasks(self.n, q_rank, kv_rank, self.local, self.causal)


class MetaPlan:
    """Masks from per-token metadata (packed documents, padding, sliding windows), cached per rank pair.

    ``metas[r]`` describes the tokens rank ``r`` holds, in its local order.
    """

    def __init__(self, metas: list[TokenMeta], causal: bool, window=None):
        self.metas, self.causal, self.window = metas, causal, window
        self._cache: dict[tuple[int, int], list[Task]] = {}

    def tasks(self, q_rank: int, kv_rank: int) -> list[Task]:
        key = (q_rank, kv_rank)
        if key not in self._cache:
            self._cache[key] = block_tasks(self.metas[q_rank], self.metas[kv_rank], self.causal, self.window)
        return self._cache[key]
