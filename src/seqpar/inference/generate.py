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
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..attention import STRATEGIES, attention
from ..core import comm
from ..core.errors import ConfigError, ShapeError, check
from ..core.kernels import attention_with_lse
from ..core.mesh import Mesh, group_rank, group_size
from ..core.packing import SeqInfo
from ..tp._base import TPModule
from . import hf as _hf
from .cache import CacheError, KVCache, LayerCache
from .common import check_prompt, check_tokens, decode_attention, merge_over_group, new_cache, split_prompt, token_owner
from .sampling import Sampler

__all__ = ["prefill", "decode_step", "decode", "generate", "merge_over_group"]

_NEEDS = ("embed", "layers", "norm", "lm_head", "hidden_states", "mesh", "layout", "sequence_parallel")


def _check_model(model: nn.Module, mesh: Mesh | None) -> Mesh:
    """The mesh to run on; raise before any collective if the model is not seqpar's reference model."""
    missing = [a for a in _NEEDS if not hasattr(model, a)]
    check(not missing, ConfigError,
          f"{type(model).__name__} lacks {missing}: seqpar.inference drives seqpar.models.LlamaForCausalLM "
          f"(its per-layer cache hook) or a Hugging Face causal LM prepared by seqpar.integrations.hf.apply")
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
        return decode_attention(self.layer, self.own, q, k, v, self.group)


def _local_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_with_lse(q, k, v, causal=True)[0]


def _prompt_layout(model, mesh: Mesh, layout, s: int, pad: bool) -> tuple[SeqInfo, object]:
    """How the prompt splits over the sp group (with Megatron SP each shard is cut again over tp)."""
    t = mesh.tp if model.sequence_parallel else 1
    info = split_prompt(layout if layout is not None else model.layout, mesh, s, pad, tp_cut=t)
    return info, info.layout


def prefill(model: nn.Module, input_ids: torch.Tensor, mesh: Mesh | None = None, strategy: str | None = None, *,
            layout=None, pad: bool = True, reserve: int = 0) -> tuple[KVCache, torch.Tensor]:
    """Run the prompt sequence-parallel and fill this rank's shard of the KV cache.

    Args:
        model: a :class:`seqpar.models.LlamaForCausalLM` (any tp; ``sequence_parallel`` either way),
            or a Hugging Face causal LM prepared by :func:`seqpar.integrations.hf.apply`
            (see :mod:`seqpar.inference.hf`).
        input_ids: ``[B, S]`` the *full* prompt, identical on every rank; sharded here.
        mesh: defaults to the model's; its sp group shards the prompt and the cache.
        strategy: attention strategy of the prefill (``ring``, ``usp``, ``ulysses``, ``allgather``...);
            default the model's.
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
    if _hf.settings(model) is not None:
        return _hf.prefill(model, input_ids, mesh, strategy, layout=layout, pad=pad, reserve=reserve)
    mesh = _check_model(model, mesh)
    strategy = strategy or getattr(model, "strategy", "ring")
    check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {STRATEGIES}")
    check_prompt(input_ids, reserve, mesh.sp_group)
    b, s = input_ids.shape
    n, rank = group_size(mesh.sp_group), group_rank(mesh.sp_group)
    info, lay = _prompt_layout(model, mesh, layout, s, pad)
    device = model.embed.weight.device
    idx = info.indices(rank)
    cache, keep, spare = new_cache(info, mesh, b, len(model.layers), reserve, device)
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
    owner, li = token_owner(info, last)
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
        model: the model that filled ``cache`` (same mesh): reference or prepared Hugging Face model.
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
    if _hf.settings(model) is not None:
        return _hf.decode_step(model, cache, token_ids)
    mesh = _check_model(model, cache.mesh)
    check(len(cache.layers) == len(model.layers) and all(layer is not None for layer in cache.layers), CacheError,
          f"the cache has {len(cache.layers)} layers filled for a model of {len(model.layers)}: "
          f"use the cache prefill returned for this model")
    check_tokens(token_ids, cache)
    device = model.embed.weight.device
    owner, position = cache.next_owner(), cache.seq_len
    hooks = [_DecodeLayer(layer, owner == cache.rank, mesh.sp_group) for layer in cache.layers]
    cache._begin_step()
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
             strategy: str | None = None, *, layout=None, pad: bool = True, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Sequence-parallel :func:`prefill`, then :func:`decode` (one :func:`decode_step` per token).

    Args:
        model: as :func:`prefill` (the reference model or a prepared Hugging Face model).
        input_ids: ``[B, S]`` the full prompt, identical on every rank.
        max_new_tokens: tokens to generate (>= 0).
        mesh, strategy, layout, pad: as :func:`prefill`.
        do_sample, temperature, top_k, top_p, seed, eos_token_id, pad_token_id: as :func:`decode`.
    Returns:
        ``[B, S + n]`` prompt followed by the generated ids (``n <= max_new_tokens``), on every rank.
    Communication: prefill's, then decode's.
    """
    check(isinstance(max_new_tokens, int) and max_new_tokens >= 0, ShapeError,
          f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)  # bad settings fail before the prefill
    mesh = _hf.check_mesh(model, mesh) if _hf.settings(model) is not None else _check_model(model, mesh)
    if max_new_tokens == 0:
        return input_ids.clone()
    cache, logits = prefill(model, input_ids, mesh, strategy, layout=layout, pad=pad, reserve=max_new_tokens)
    new = decode(model, cache, logits, max_new_tokens, sampler=sampler, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id)
    return torch.cat([input_ids.to(new.device), new], dim=1)


def decode(model: nn.Module, cache: KVCache, logits: torch.Tensor, max_new_tokens: int, *,
           sampler: Sampler | None = None, eos_token_id: int | list[int] | None = None,
           pad_token_id: int | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after a :func:`prefill` (the cache is advanced in place).

    Args:
        cache, logits: what prefill returned (logits of the last prompt token, ``[B, V/t]``).
        sampler: how tokens are chosen (:class:`Sampler`: greedy by default, or do_sample with
            temperature / top_k / top_p / seed, HF's meaning).  Every rank returns the same tokens.
        eos_token_id: stop a sequence at this token (or any of these); generation ends early once
            every sequence has stopped, and stopped sequences are padded with ``pad_token_id``
            (default: the first eos id), as HF does.
    Returns:
        ``[B, n]`` the new ids (``n <= max_new_tokens``), on every rank.
    Communication: per token, the choice of the token (greedy: an all-gather of 2 values per
    sequence over tp; sampling: see :class:`Sampler`) and a :func:`decode_step` but for the last.
    """
    sampler = sampler if sampler is not None else Sampler()
    eos = [] if eos_token_id is None else [int(x) for x in torch.tensor(eos_token_id).reshape(-1).tolist()]
    mesh = cache.mesh
    out = []
    done = torch.zeros(cache.batch, dtype=torch.bool, device=logits.device)
    filler = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    for step in range(max_new_tokens):
        nxt = sampler.next_tokens(logits, mesh)  # [B], the same on every rank
        shown = nxt
        if eos:
            # a stopped sequence shows the padding and is fed its eos (a valid id; its later tokens are unused)
            shown = torch.where(done, torch.full_like(nxt, filler), nxt)
            nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
            done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
        out.append(shown[:, None])
        if bool(done.all()) or step + 1 == max_new_tokens:  # the same on every rank: all stop together
            break
        logits = decode_step(model, cache, nxt)
    return torch.cat(out, dim=1) if out else logits.new_zeros(cache.batch, 0, dtype=torch.long)
