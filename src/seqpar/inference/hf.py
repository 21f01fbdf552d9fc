"""Sequence-parallel inference for Hugging Face causal LMs prepared by :func:`seqpar.integrations.hf.apply`.

::

    mesh = seqpar.init(sp=4)
    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16).eval()
    hf.apply(model, mesh, strategy="ring")                    # the same call as for training
    ids = seqpar.inference.generate(model, prompt, max_new_tokens=64)   # prompt [B, S] on every rank

:func:`seqpar.inference.prefill`, ``decode_step`` and ``generate`` dispatch here for such
models; the scheme is the reference model's (``docs/inference.md``): the prompt runs
sequence-parallel, each rank caches the keys/values of its own tokens, and decode merges
the ranks' partial attentions by log-sum-exp with one small all-gather per layer.

How it plugs into transformers.  No ``transformers.Cache`` is involved: the model runs
with ``use_cache=False``, so each attention module hands the registered ``"seqpar"``
attention function the roped q/k/v of exactly the tokens it was given.  seqpar's cache
travels as a keyword (``seqpar_cache``) that HF forwards, like ``seqpar_info``, from
``model(...)`` down to that function, which then

* in prefill, stores this rank's real (non-padding) keys/values in the layer's slot
  (``module.layer_idx``) and runs :func:`seqpar.attention` as in training;
* in decode, runs :func:`~seqpar.inference.common.decode_attention` on the layer's shard,
  restricted to the keys inside the layer's sliding window when it has one (HF's rule:
  key ``j`` visible to the query at ``p`` iff ``p - window < j``).

This keeps the integration independent of the Cache API (which changed between
transformers 4.53 and 5.x), and HF never holds, gathers or pads the cache.  RoPE comes
from the ``position_ids`` passed here (the global positions), so HF's own
``cache_position`` bookkeeping is never needed.  Use these functions instead of
``model.generate``, whose mask and cache logic assume one device holds the sequence.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import STRATEGIES
from ..core import comm
from ..core.errors import ConfigError, check
from ..core.layout import resolve_layout
from ..core.mesh import Mesh, group_size
from ..integrations._hf_batch import INFO_KEY
from ..integrations.hf import CACHE_KEY, _Settings
from .cache import CacheError, KVCache, LayerCache
from .common import check_prompt, check_tokens, decode_attention, new_cache, split_prompt, token_owner, window_keys

__all__ = ["settings", "check_mesh", "prefill", "decode_step"]


def settings(model: nn.Module) -> _Settings | None:
    """What :func:`seqpar.integrations.hf.apply` stored on ``model``; None for a non-HF model.

    Raises a ConfigError for a transformers model that apply() has not prepared.
    """
    s = getattr(model, "_seqpar_settings", None)
    if isinstance(s, _Settings):
        return s
    check(not type(model).__module__.startswith("transformers."), ConfigError,
          f"{type(model).__name__} is a Hugging Face model not prepared for sequence parallelism: call "
          f"seqpar.integrations.hf.apply(model, mesh, strategy=...) first")
    return None


def check_mesh(model: nn.Module, mesh: Mesh | None) -> Mesh:
    """The mesh the prepared ``model`` runs on; ``mesh``, when given, must be that one."""
    s = settings(model)
    check(mesh is None or mesh is s.mesh or (mesh.sp == s.mesh.sp and mesh.dp == s.mesh.dp), ConfigError,
          f"mesh {mesh} is not the one {s.name} was prepared on ({s.mesh}): pass the mesh given to "
          f"seqpar.integrations.hf.apply, or leave mesh=None")
    return s.mesh


def _num_layers(model: nn.Module) -> int:
    """Decoder layers of an HF model (composite configs keep them in their text config)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    check(isinstance(n, int) and n > 0, ConfigError,
          f"{type(model).__name__}'s config names no num_hidden_layers: seqpar inference cannot size its cache")
    return n


def _layer_index(module: nn.Module, cache: KVCache) -> int:
    i = getattr(module, "layer_idx", None)
    check(isinstance(i, int) and 0 <= i < len(cache.layers), ConfigError,
          f"{type(module).__name__} has layer_idx={i!r}, not a layer of a {len(cache.layers)}-layer cache: "
          f"seqpar inference needs HF attention modules that know their layer index")
    return i


class _Prefill:
    """The ``seqpar_cache`` of a prefill forward: keep this rank's real k/v per layer, attend as in training."""

    decoding = False

    def __init__(self, cache: KVCache, keep: torch.Tensor | None, spare: int, strategy: str):
        self.cache, self.keep, self.spare, self.strategy = cache, keep, spare, strategy

    def store(self, module: nn.Module, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
        """``k, v [B, S/sp, Hkv, D]`` this rank's roped keys and values (padding included).

        A sliding-window layer keeps only the keys a decoded token can still see: the first one
        sits at the prompt length ``s`` and sees positions ``> s - window``, later ones less.
        """
        keep, cache = self.keep, self.cache
        if window is not None and cache.ordered:
            first = int((cache.positions <= cache.prompt_len - int(window)).sum())
            if first:
                keep = (torch.arange(cache.local_len, device=k.device) if keep is None else keep)[first:]
        if keep is not None:
            k, v = k.index_select(1, keep), v.index_select(1, keep)
        cache.layers[_layer_index(module, cache)] = LayerCache(k, v, reserve=self.spare)  # copies


class _Decode:
    """The ``seqpar_cache`` of a decode forward: one token per sequence at global ``position``."""

    decoding = True

    def __init__(self, cache: KVCache, owner: int, position: int):
        self.cache, self.position = cache, position
        self.own = owner == cache.rank
        self._keys: dict[int, torch.Tensor | None] = {}  # visible cached keys per window size, once per step

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

    def decode(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None, sliding_window: int | None) -> torch.Tensor:
        """q ``[B, 1, H, D]``, k/v ``[B, 1, Hkv, D]`` -> ``[B, 1, H, D]``: see decode_attention.

        On a sliding-window layer the keys that fell out of the window are forgotten (they are
        outside every later query's window too), so the layer holds at most ``window`` tokens
        over all ranks, as HF's sliding-window caches do on one device.
        """
        layer = self.cache.layers[_layer_index(module, self.cache)]
        group = self.cache.mesh.sp_group
        if sliding_window is None:
            return decode_attention(layer, self.own, q, k, v, group, scale=scale)
        window = int(sliding_window)
        if not self.cache.ordered:
            return decode_attention(layer, self.own, q, k, v, group, scale=scale, keys=self._visible(window, q.device))
        layer.check(k, v)  # on every rank, before the owner's append (a misfit must fail everywhere)
        if self.own:  # stored before attending, as decode_attention would
            layer.append(k, v)
        layer.drop_front(int((self._positions(layer.len) <= self.position - window).sum()))
        return decode_attention(layer, False, q, k, v, group, scale=scale)


def prefill(model: nn.Module, input_ids: torch.Tensor, mesh: Mesh | None = None, strategy: str | None = None, *,
            layout=None, pad: bool = True, reserve: int = 0) -> tuple[KVCache, torch.Tensor]:
    """:func:`seqpar.inference.prefill` for a prepared HF model (arguments and result as there).

    ``strategy`` defaults to the one given to apply(); ``layout`` must be apply()'s (None = it).
    Returns ``(cache, logits [B, V])``: the last prompt token's logits, the same on every rank.
    Communication: the model's forward on ``S/sp`` tokens (the strategy's attention traffic),
    then one all-reduce over sp of the last token's logits ``[B, V]`` from the rank holding it.
    """
    s = settings(model)
    mesh = check_mesh(model, mesh)
    strategy = strategy or s.strategy
    check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
    check_prompt(input_ids, reserve, mesh.sp_group)
    group = mesh.sp_group
    applied = resolve_layout(s.layout, group, mesh)
    check(layout is None or resolve_layout(layout, group, mesh) == applied, ConfigError,
          f"{s.name} was prepared with layout={s.layout!r}; prefill cannot use layout={layout!r}: leave "
          f"layout=None or call seqpar.integrations.hf.apply(model, mesh, layout={layout!r})")
    b, n = input_ids.shape[0], group_size(group)
    info = split_prompt(applied, mesh, input_ids.shape[1], pad)
    device = model.get_input_embeddings().weight.device
    num_layers = _num_layers(model)
    cache, keep, spare = new_cache(info, mesh, b, num_layers, reserve, device)
    idx = info.indices(cache.rank).to(device)
    owner, li = token_owner(info, info.seq_len - 1)
    step = _Prefill(cache, keep, spare, strategy)
    ids_local = info.pad(input_ids.to(device), 1, 0).index_select(1, idx)
    with torch.no_grad():
        # one document: RoPE positions are the global ones (padding continues them and is masked)
        out = model(input_ids=ids_local, position_ids=idx.unsqueeze(0).expand(b, -1),
                    logits_to_keep=torch.tensor([li if cache.rank == owner else 0], device=device),
                    **{INFO_KEY: info, CACHE_KEY: step})
        logits = out.logits[:, -1]
        if n > 1:  # only the owner's row is the last token's: a sum with zeros elsewhere is exact
            if cache.rank != owner:
                logits = torch.zeros_like(logits)
            logits = comm.all_reduce(logits, group)
    missing = [i for i, layer in enumerate(cache.layers) if layer is None]
    check(not missing, CacheError,
          f"{s.name}: layers {missing} did not pass their keys/values to the seqpar attention function, so "
          f"their cache is empty: this architecture cannot decode with seqpar")
    return cache, logits


def decode_step(model: nn.Module, cache: KVCache, token_ids: torch.Tensor) -> torch.Tensor:
    """:func:`seqpar.inference.decode_step` for a prepared HF model (arguments and result as there).

    Returns ``[B, V]`` logits of the following token, the same on every rank.
    Communication per layer: one all-gather over sp of ``[B, 1, H, D+1]`` float32.
    """
    s = settings(model)
    check(cache.mesh is s.mesh or cache.mesh.sp == s.mesh.sp, CacheError,
          f"the cache was filled on {cache.mesh}, but {s.name} runs on {s.mesh}: use the cache from its prefill")
    n_layers = _num_layers(model)
    check(len(cache.layers) == n_layers and all(x is not None for x in cache.layers),
          CacheError, f"the cache has {len(cache.layers)} layers for a model of {n_layers}: use the cache "
                      f"prefill returned for this model")
    check_tokens(token_ids, cache)
    device = model.get_input_embeddings().weight.device
    owner, position = cache.next_owner(), cache.seq_len
    step = _Decode(cache, owner, position)
    cache._begin_step()
    try:
        with torch.no_grad():
            out = model(input_ids=token_ids.to(device)[:, None],
                        position_ids=torch.full((cache.batch, 1), position, device=device), **{CACHE_KEY: step})
    except BaseException:
        cache._rollback()
        raise
    cache._commit(owner, position)
    return out.logits[:, -1]
