"""Sequence-parallel prefill into a sharded KV cache, and decode merged by log-sum-exp across ranks.

Prefill
    The prompt is sharded over the sequence-parallel group in the model's layout and run
    through the model with any strategy (``ring``, ``usp``...).  Each rank stores the roped
    keys and values of *its own* tokens; the cache is never gathered.  Only the hidden
    state of the last prompt token crosses ranks (one all-reduce of ``[B, 1, h]``).

Decode
    The new token is replicated on every rank (its query, key and value are computed
    everywhere, as a single device would).  Each rank attends the query to its local
    cache shard with :func:`seqpar.kernels.attention_with_lse`; the partial ``(out, lse)``
    pairs are then merged in float32 after **one** all-gather per layer of
    ``[B, 1, H/t, D+1]`` (out with lse appended), whose size does not depend on how many
    tokens are cached.  The new token's key/value go to one rank only
    (:meth:`KVCache.next_owner`: the rank with the fewest tokens), which appends them
    *before* attending, so the token also sees itself while the others do not count it twice.

Tensor parallelism (``tp > 1``): heads are split over tp as in training; the cache holds
``Hkv/t`` heads per rank.  A single decoded token cannot be cut along the sequence for
Megatron sequence parallelism, so decode (and the last-token LM head) runs the tp modules
in their replicated mode: column-parallel q/k/v, then o_proj's all-reduce.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn

from .. import comm
from ..attention import STRATEGIES, attention
from ..errors import ConfigError, ShapeError, check
from ..kernels import attention_with_lse, merge_into
from ..layout import resolve_layout
from ..mesh import Mesh, group_rank, group_size
from ..packing import SeqInfo
from ..tp._base import TPModule
from ..tp.cross_entropy import vocab_parallel_argmax
from .cache import CacheError, KVCache, LayerCache

__all__ = ["prefill", "decode_step", "generate", "merge_over_group"]

_NEEDS = ("embed", "layers", "norm", "lm_head", "hidden_states", "mesh", "layout", "sequence_parallel")


def _check_model(model: nn.Module, mesh: Mesh | None) -> Mesh:
    """The mesh to run on; raise before any collective if the model is not seqpar's reference model."""
    missing = [a for a in _NEEDS if not hasattr(model, a)]
    check(not missing, ConfigError,
          f"{type(model).__name__} lacks {missing}: seqpar.inference drives seqpar.models.LlamaForCausalLM "
          f"(its per-layer cache hook); Hugging Face models are not supported yet (see docs/inference.md)")
    mesh = mesh if mesh is not None else model.mesh
    check(mesh.sp == model.mesh.sp and mesh.tp == model.mesh.tp, ConfigError,
          f"mesh {mesh} does not match the model's {model.mesh}: build the model on the mesh you infer with")
    return mesh


@contextlib.contextmanager
def _replicated_tp(model: nn.Module) -> Iterator[None]:
    """Run tp modules with ``sequence_parallel=False`` inside the block (a 1-token input cannot be split
    over tp): embedding and row-parallel outputs are all-reduced instead of reduce-scattered.
    Restored on exit.  Nothing to do without tensor parallelism."""
    flipped = [m for m in model.modules()
               if isinstance(m, TPModule) and getattr(m, "sequence_parallel", False) and m.tp_size > 1]
    for m in flipped:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in flipped:
            m.sequence_parallel = True


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions of the same queries over disjoint key shards held by the ranks of ``group``.

    Args:
        out: ``[B, L, H, D]`` this rank's partial output; lse: ``[B, H, L]`` (``-inf`` where the
            rank's shard holds no visible key, e.g. an empty shard).
    Returns:
        (out ``[B, L, H, D]``, lse ``[B, H, L]``) in float32 (float64 for float64 input), identical
        on every rank (every rank merges the same parts in rank order).
    Communication: one all-gather of ``[B, L, H, D + 1]`` (out with lse appended) per call.
    """
    n = group_size(group)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    if n == 1:
        return out.to(acc), lse.to(acc)
    packed = torch.cat([out.to(acc), lse.to(acc).transpose(1, 2).unsqueeze(-1)], dim=-1)  # [B, L, H, D+1]
    parts = comm.all_gather(packed, 0, group).view(n, *packed.shape)  # rank-major
    acc_out = parts[0, ..., :-1].clone()
    acc_lse = parts[0, ..., -1].transpose(1, 2).contiguous()
    for r in range(1, n):
        merge_into(acc_out, acc_lse, parts[r, ..., :-1], parts[r, ..., -1].transpose(1, 2))
    return acc_out, acc_lse


class _PrefillLayer:
    """Cache hook of one layer during prefill: keep this rank's real k/v, attend sequence-parallel."""

    def __init__(self, cache: KVCache, index: int, keep: torch.Tensor | None, attend: Callable, reserve: int):
        self.cache, self.index, self.keep, self.attend, self.reserve = cache, index, keep, attend, reserve

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kk, vv = (k, v) if self.keep is None else (k.index_select(1, self.keep), v.index_select(1, self.keep))
        self.cache.layers[self.index] = LayerCache(kk, vv, reserve=self.reserve)  # a copy: never aliases activations
        return self.attend(q, k, v)


class _DecodeLayer:
    """Cache hook of one layer during decode: maybe append, attend the local shard, merge over ranks."""

    def __init__(self, layer: LayerCache, own: bool, group):
        self.layer, self.own, self.group = layer, own, group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.own:  # the owner stores the token first, so the token attends to itself exactly once
            self.layer.append(k, v)
        # no causal mask: every cached token is earlier than (or is) the new one
        out, lse = attention_with_lse(q, self.layer.k, self.layer.v)
        out, _ = merge_over_group(out, lse, self.group)
        return out.to(q.dtype)


def _local_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_with_lse(q, k, v, causal=True)[0]


def _prompt_layout(model, mesh: Mesh, layout, s: int, pad: bool) -> tuple[SeqInfo, object]:
    """How the prompt splits over the sp group, padded at its end when the layout needs it."""
    group = mesh.sp_group
    n = group_size(group)
    lay = resolve_layout(layout if layout is not None else model.layout, group, mesh)
    # with Megatron SP each rank's shard is cut again over tp by the embedding's reduce-scatter
    t = mesh.tp if model.sequence_parallel else 1
    unit = n * lay.granule * t
    padded = -(-s // unit) * unit
    check(pad or padded == s, ShapeError,
          f"prompt length {s} does not split over sp={n}" + (f" x tp={t}" if t > 1 else "") +
          f" in layout {lay.name!r} (needs a multiple of {unit}): pass pad=True (padding is masked in prefill "
          f"and never cached) or give a prompt of a multiple of {unit} tokens")
    return SeqInfo(lay, n, (0, s), (0, padded)), lay


def prefill(model: nn.Module, input_ids: torch.Tensor, mesh: Mesh | None = None, strategy: str = "ring", *,
            layout=None, pad: bool = True, reserve: int = 0) -> tuple[KVCache, torch.Tensor]:
    """Run the prompt sequence-parallel and fill this rank's shard of the KV cache.

    Args:
        model: a :class:`seqpar.models.LlamaForCausalLM` (any tp; ``sequence_parallel`` either way).
        input_ids: ``[B, S]`` the *full* prompt, identical on every rank; sharded here.
        mesh: defaults to the model's; its sp group shards the prompt and the cache.
        strategy: attention strategy of the prefill (``ring``, ``usp``, ``ulysses``, ``allgather``...).
        layout: sequence layout (default the model's), e.g. ``zigzag`` or ``contiguous``.
        pad: pad a prompt the layout cannot split at its end (padding is masked and never cached);
            ``False`` raises a ShapeError naming the length needed instead.
        reserve: decode tokens to preallocate room for (over all ranks).
    Returns:
        ``(cache, logits)``: this rank's :class:`KVCache` (``[B, ~S/sp, Hkv/t, D]`` per layer) and the
        last prompt token's logits ``[B, V/t]`` (vocabulary split over tp), the same on every sp rank.
    Communication: the model's forward on ``S/sp`` tokens (the strategy's attention traffic, tp's
    collectives), then one all-reduce of ``[B, 1, h]`` over sp (and tp with sequence parallelism) for
    the last token's hidden state.  The cache itself never moves.
    """
    mesh = _check_model(model, mesh)
    check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
    check(isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0
          and not input_ids.is_floating_point(), ShapeError,
          f"input_ids must be the full prompt as integer ids [batch, seq] with seq > 0, got "
          f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    check(isinstance(reserve, int) and reserve >= 0, ShapeError, f"reserve={reserve!r} must be an int >= 0")
    b, s = input_ids.shape
    group = mesh.sp_group
    n, rank = group_size(group), group_rank(group)
    info, lay = _prompt_layout(model, mesh, layout, s, pad)
    device = model.embed.weight.device
    idx = info.indices(rank)  # positions (in the padded prompt) this rank holds; padding sits at >= s
    real = idx < s
    keep = None if bool(real.all()) else real.nonzero().flatten().to(device)
    lengths = [int((info.indices(r) < s).sum()) for r in range(n)]
    cache = KVCache(mesh=mesh, rank=rank, n=n, lengths=lengths, positions=idx[real], prompt_len=s,
                    num_layers=len(model.layers), batch=b)
    # room for this rank's share of the decode tokens (fewest-first fills the short shards first)
    spare = max(0, -(-(s + reserve) // n) + 1 - lengths[rank]) if reserve else 0
    if n > 1:
        attend = functools.partial(attention, causal=True, strategy=strategy, mesh=mesh, layout=lay,
                                   seq_info=info if info.padding else None)
    else:
        # one rank holds the padded prompt in order, padding last: plain causal attention is exact for the
        # real tokens.  (Also keeps a world-1 mesh local: the strategies' group=None would mean the
        # process's default mesh, a real group, inside a distributed job.)
        attend = _local_causal
    hooks = [_PrefillLayer(cache, i, keep, attend, spare) for i in range(len(model.layers))]
    ids_local = info.pad(input_ids.to(device), 1, 0).index_select(1, idx.to(device))
    with torch.no_grad():
        # a single document: RoPE positions are the global ones (padding continues them, masked anyway)
        h = model.hidden_states(ids_local, position_ids=idx.to(device), cache=hooks)
        last = _last_token_hidden(h, info, s - 1, mesh, model.sequence_parallel)
        with _replicated_tp(model):
            logits = model.lm_head(model.norm(last))  # [B, 1, V/t]
    return cache, logits[:, 0]


def _last_token_hidden(h: torch.Tensor, info: SeqInfo, last: int, mesh: Mesh, sp_on_tp: bool) -> torch.Tensor:
    """``[B, 1, h]`` hidden state of global token ``last``, on every rank, from the one rank that holds it.

    Communication: all-reduce of ``[B, 1, h]`` over sp (and over tp when the model is Megatron
    sequence-parallel, where the shard is cut again over tp).  Sum with zeros elsewhere: exact.
    """
    n = info.n
    owner = next(r for r in range(n) if bool((info.indices(r) == last).any()))
    li = int((info.indices(owner) == last).nonzero())
    mine = mesh.rank("sp") == owner
    if sp_on_tp:
        chunk = info.local_len // mesh.tp
        tp_owner, li = divmod(li, chunk)
        mine = mine and mesh.rank("tp") == tp_owner
    x = h[:, li:li + 1] if mine else torch.zeros_like(h[:, :1])
    if n > 1:
        x = comm.all_reduce(x, mesh.sp_group)
    if sp_on_tp:
        x = comm.all_reduce(x, mesh.tp_group)
    return x


def decode_step(model: nn.Module, cache: KVCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence and return the logits of the next one.

    Args:
        model: the model that filled ``cache`` (same mesh).
        cache: from :func:`prefill`; advanced in place (one rank stores the new token).
        token_ids: ``[B]`` the newest token of each sequence, identical on every rank.
    Returns:
        ``[B, V/t]`` logits of the following token (vocabulary split over tp), the same on every sp rank.
    The token's RoPE position is ``cache.seq_len`` (prompt length + tokens decoded so far).
    Communication per layer: one all-gather over sp of ``[B, 1, H/t, D+1]`` float32 (the partial
    out and lse; independent of the cached length), plus with tp the o_proj and MLP all-reduces
    of ``[B, 1, h]`` (and one for the embedding).  The cache is never gathered.
    """
    check(isinstance(cache, KVCache), CacheError, f"cache must be a KVCache from prefill, got {type(cache).__name__}")
    mesh = _check_model(model, cache.mesh)
    check(len(cache.layers) == len(model.layers) and all(layer is not None for layer in cache.layers), CacheError,
          f"the cache has {len(cache.layers)} layers filled for a model of {len(model.layers)}: "
          f"use the cache prefill returned for this model")
    check(isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1 and token_ids.shape[0] == cache.batch
          and not token_ids.is_floating_point(), ShapeError,
          f"token_ids must be integer ids [batch={cache.batch}], got "
          f"{tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
    device = model.embed.weight.device
    owner, position = cache.next_owner(), cache.seq_len
    hooks = [_DecodeLayer(layer, owner == cache.rank, mesh.sp_group) for layer in cache.layers]
    try:
        with torch.no_grad(), _replicated_tp(model):
            logits = model(token_ids.to(device)[:, None], position_ids=torch.tensor([position], device=device),
                           cache=hooks)
    except BaseException:
        cache._rollback()
        raise
    cache._commit(owner, position)
    return logits[:, 0]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, mesh: Mesh | None = None,
             strategy: str = "ring", *, layout=None, pad: bool = True) -> torch.Tensor:
    """Greedy generation: sequence-parallel :func:`prefill`, then :func:`decode_step` per token.

    Args:
        input_ids: ``[B, S]`` the full prompt, identical on every rank.
        max_new_tokens: tokens to generate (>= 0).
        mesh, strategy, layout, pad: as :func:`prefill`.
    Returns:
        ``[B, S + max_new_tokens]`` prompt followed by the generated ids, on every rank.
    Communication: prefill's, then per token the decode step's and the vocab-parallel argmax
    (an all-gather of 2 values per sequence over tp; nothing without tp).
    """
    check(isinstance(max_new_tokens, int) and max_new_tokens >= 0, ShapeError,
          f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    mesh = _check_model(model, mesh)
    if max_new_tokens == 0:
        return input_ids.clone()
    cache, logits = prefill(model, input_ids, mesh, strategy, layout=layout, pad=pad, reserve=max_new_tokens)
    out = [input_ids.to(logits.device)]
    for step in range(max_new_tokens):
        nxt = vocab_parallel_argmax(logits, group=mesh.tp_group)  # [B]
        out.append(nxt[:, None])
        if step + 1 < max_new_tokens:  # the last token needs no cache entry
            logits = decode_step(model, cache, nxt)
    return torch.cat(out, dim=1)
