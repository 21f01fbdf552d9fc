"""The cache steps every attention layer calls during prefill and decode (:class:`~seqpar.inference.adapter.CacheStep`).

* :class:`PrefillStep`: stores this rank's real (non-padding) keys and values of the layer,
  only those a decoded token can still see on a sliding-window layer, then attends over the
  whole prompt with a seqpar strategy, as in training.
* :class:`DecodeStep`: one new token per sequence at global position ``cache.seq_len``: its
  owner appends its keys and values, every rank attends the replicated query to its local
  shard, and the ranks' partials are merged by log-sum-exp
  (:func:`~seqpar.inference.common.decode_attention`).  On a sliding-window layer the keys that
  fell out of the window are forgotten (or, for a rank whose positions do not ascend, skipped).

Both are model-agnostic: the reference model and Hugging Face models hand them their q/k/v
through their adapters (:mod:`seqpar.inference.adapter`).
"""
from __future__ import annotations

from typing import Any

import torch

from ..attention import attention
from ..core.kernels import attention_with_lse
from ..core.mesh import Mesh
from ..core.packing import SeqInfo
from .cache import KVCache
from .common import decode_attention, window_keys

__all__ = ["PrefillStep", "DecodeStep"]


class PrefillStep:
    """The cache step of a prefill forward: keep this rank's real k/v per layer, attend over the prompt.

    Args:
        cache: the rank's empty cache (from :func:`~seqpar.inference.common.new_cache`), filled here.
        keep: indices of the real tokens of the rank's shard (None: all are real).
        spare: room to reserve per layer for decoded tokens.
        strategy, mesh: the sequence-parallel attention of the prompt.
        info: how the prompt is split (layout, padding).
    """

    def __init__(self, cache: KVCache, keep: torch.Tensor | None, spare: int, strategy: str, mesh: Mesh,
                 info: SeqInfo):
        self.cache, self.keep, self.spare = cache, keep, spare
        self.strategy, self.mesh, self.info = strategy, mesh, info

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None, window: int | None = None) -> torch.Tensor:
        """Store layer ``layer``'s keys/values, then ``[B, S/sp, H, D]`` causal attention over the prompt.

        Communication: that of ``strategy`` over ``mesh.sp_group`` (none on one rank).
        """
        self.store(layer, k, v, window)
        info = self.info
        if info.n == 1 and window is None:
            # one rank holds the padded prompt in order, padding last: plain causal attention is exact for the
            # real tokens.  (Also keeps a world-1 mesh local: the strategies' group=None would mean the
            # process's default mesh, a real group, inside a distributed job.)
            return attention_with_lse(q, k, v, causal=True, scale=scale)[0]
        # a window as long as the (padded) prompt is no window, and the windowless plan is cheaper
        bounds = (int(window) - 1, 0) if window is not None and int(window) < info.padded_len else None
        layout: Any = info.layout  # a Layout object, resolved on the mesh (attention() takes one or a name)
        return attention(q, k, v, causal=True, strategy=self.strategy, mesh=self.mesh, layout=layout,
                         seq_info=info if info.padding else None, scale=scale, window=bounds)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
        """Cache ``k, v [B, S/sp, Hkv, D]`` (this rank's roped keys and values, padding included) of ``layer``.

        Padding is never stored.  A sliding-window layer keeps only the keys a decoded token can
        still see: the first one sits at the prompt length ``s`` and sees positions ``> s - window``,
        later ones less.
        """
        keep, cache = self.keep, self.cache
        if window is not None and cache.ordered:
            first = int((cache.positions <= cache.prompt_len - int(window)).sum())
            if first:
                keep = (torch.arange(cache.local_len, device=k.device) if keep is None else keep)[first:]
        if keep is not None:
            k, v = k.index_select(1, keep), v.index_select(1, keep)
        cache.fill(layer, k, v, reserve=self.spare)  # a copy: never aliases the activations


class DecodeStep:
    """The cache step of a decode forward: one token per sequence at global ``position``, stored on ``owner``."""

    def __init__(self, cache: KVCache, owner: int, position: int):
        self.cache, self.position = cache, position
        self.own = owner == cache.rank
        self._keys: dict[int, torch.Tensor | None] = {}  # visible cached keys per window size, once per step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None, window: int | None = None) -> torch.Tensor:
        """q ``[B, 1, H, D]``, k/v ``[B, 1, Hkv, D]`` -> ``[B, 1, H, D]``: see decode_attention.

        On a sliding-window layer the keys that fell out of the window are forgotten (they are
        outside every later query's window too), so the layer holds at most ``window`` tokens
        over all ranks, as HF's sliding-window caches do on one device.
        Communication: one all-gather over sp of ``[B, 1, H, D+1]`` float32.
        """
        cache = self.cache
        shard = cache.layer(layer)
        group = cache.mesh.sp_group
        if window is None:
            return decode_attention(shard, self.own, q, k, v, group, scale=scale)
        w = int(window)
        if not cache.ordered:
            return decode_attention(shard, self.own, q, k, v, group, scale=scale, keys=self._visible(w, q.device))
        shard.check(k, v)  # on every rank, before the owner's append (a misfit must fail everywhere)
        if self.own:  # stored before attending, as decode_attention would
            shard.append(k, v)
        shard.drop_front(int((self._positions(shard.len) <= self.position - w).sum()))
        return decode_attention(shard, False, q, k, v, group, scale=scale)

    def _positions(self, count: int) -> torch.Tensor:
        """Positions of this rank's last ``count`` tokens, the new one included where this rank owns it."""
        if not self.own:
            return self.cache.tail_positions(count)
        before = self.cache.tail_positions(count - 1)
        return torch.cat([before, before.new_tensor([self.position])])

    def _visible(self, window: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the visible keys, for a rank whose positions do not ascend (no built-in layout)."""
        if window not in self._keys:
            keys = window_keys(self._positions(self.cache.local_len + self.own), self.position, window)
            self._keys[window] = None if keys is None else keys.to(device)
        return self._keys[window]
