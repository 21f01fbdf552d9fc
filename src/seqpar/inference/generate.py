"""Sequence-parallel prefill into a sharded KV cache, and decode merged by log-sum-exp across ranks.

Written once for every model, against :class:`~seqpar.inference.adapter.InferenceAdapter`
(:func:`~seqpar.inference.adapter.adapter_for` finds the model's: the reference model's in
:mod:`seqpar.inference.reference`, Hugging Face models' in :mod:`seqpar.integrations.hf_inference`).

Prefill
    The prompt is sharded over the sequence-parallel group in the model's layout and run
    through the model with any strategy (``ring``, ``usp``...).  Each rank stores the roped
    keys and values of *its own* tokens (:class:`~seqpar.inference.steps.PrefillStep`); the
    cache is never gathered.  Only the last prompt token crosses ranks (one all-reduce of its
    hidden state or its logits, whichever the adapter picks: :class:`~seqpar.inference.adapter.LastToken`).

Decode
    The new token is replicated on every rank (its query, key and value are computed
    everywhere, as a single device would).  Each rank attends the query to its local
    cache shard with :func:`seqpar.kernels.attention_with_lse`; the partial ``(out, lse)``
    pairs are then merged in float32 after **one** all-gather per layer of
    ``[B, 1, H/t, D+1]`` (out with lse appended), whose size does not depend on how many
    tokens are cached.  The new token's key/value go to one rank only
    (:meth:`KVCache.next_owner`: the rank with the fewest tokens), which appends them
    *before* attending, so the token also sees itself while the others do not count it twice
    (:class:`~seqpar.inference.steps.DecodeStep`).  A step is a cache transaction
    (:meth:`KVCache.begin` / :meth:`~KVCache.commit` / :meth:`~KVCache.rollback`): one that fails
    part-way leaves the cache as it was.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import Mesh
from ..core.strategies import SP_STRATEGIES
from .adapter import InferenceAdapter, LastToken, adapter_for
from .cache import CacheError, KVCache
from .common import check_prompt, check_tokens, merge_over_group, new_cache, split_prompt
from .sampling import Sampler
from .steps import DecodeStep, PrefillStep

__all__ = ["prefill", "decode_step", "decode", "generate", "merge_over_group"]


def prefill(model: Any, input_ids: torch.Tensor, mesh: Mesh | None = None, strategy: str | None = None, *,
            layout: Any = None, pad: bool = True, reserve: int = 0) -> tuple[KVCache, torch.Tensor]:
    """Run the prompt sequence-parallel and fill this rank's shard of the KV cache.

    Args:
        model: a :class:`seqpar.models.LlamaForCausalLM` (any tp; ``sequence_parallel`` either way),
            a Hugging Face causal LM prepared by :func:`seqpar.integrations.hf.apply`, or any
            :class:`~seqpar.inference.InferenceAdapter`.
        input_ids: ``[B, S]`` the *full* prompt, identical on every rank; sharded here.
        mesh: defaults to the model's; its sp group shards the prompt and the cache.
        strategy: attention strategy of the prefill (``ring``, ``usp``, ``ulysses``, ``allgather``...);
            default the model's.
        layout: sequence layout (default the model's), e.g. ``zigzag`` or ``contiguous`` (a Hugging
            Face model runs the layout given to apply()).
        pad: pad a prompt the layout cannot split at its end (padding is masked and never cached);
            ``False`` raises a ShapeError naming the length needed instead.
        reserve: decode tokens to preallocate room for (over all ranks).
    Returns:
        ``(cache, logits)``: this rank's :class:`KVCache` (``[B, ~S/sp, Hkv/t, D]`` per layer) and the
        last prompt token's logits ``[B, V/t]`` (vocabulary split over tp), the same on every sp rank.
    Communication: the model's forward on ``S/sp`` tokens (the strategy's attention traffic, tp's
    collectives), then one all-reduce over sp (and tp with Megatron sequence parallelism) of the
    last token's hidden state ``[B, 1, h]`` (reference model) or logits ``[B, V]`` (Hugging Face
    models, whose own head computes them).  The cache itself never moves.
    """
    adapter = adapter_for(model)
    mesh = adapter.check_mesh(mesh)
    strategy = strategy or adapter.strategy
    check(strategy in SP_STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {SP_STRATEGIES}")
    check_prompt(input_ids, reserve, mesh.sp_group)
    b, s = input_ids.shape
    info = split_prompt(adapter.prompt_layout(layout, mesh), mesh, s, pad, tp_cut=adapter.tp_cut)
    device = adapter.device
    cache, keep, spare = new_cache(info, mesh, b, adapter.num_layers, reserve, device)
    idx = info.indices(cache.rank).to(device)
    step = PrefillStep(cache, keep, spare, strategy, mesh, info)
    ids_local = info.pad(input_ids.to(device), 1, 0).index_select(1, idx)
    with torch.no_grad():
        # one document: RoPE positions are the global ones (padding continues them and is masked)
        logits = adapter.logits(ids_local, idx, step, LastToken.of(info, mesh, adapter.tp_cut))
    missing = cache.missing()
    check(not missing, CacheError,
          f"{adapter.name}: layers {missing} did not pass their keys/values to the seqpar attention, so their "
          f"cache is empty: this architecture cannot decode with seqpar")
    return cache, logits[:, -1]


def decode_step(model: Any, cache: KVCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence and return the logits of the next one.

    Args:
        model: the model that filled ``cache`` (same mesh), as :func:`prefill`.
        cache: from :func:`prefill`; advanced in place (one rank stores the new token).  A step that
            fails part-way leaves it as it was.
        token_ids: ``[B]`` the newest token of each sequence, identical on every rank.
    Returns:
        ``[B, V/t]`` logits of the following token (vocabulary split over tp), the same on every sp rank.
    The token's RoPE position is ``cache.seq_len`` (prompt length + tokens decoded so far).
    Communication per layer: one all-gather over sp of ``[B, 1, H/t, D+1]`` float32 (the partial
    out and lse; independent of the cached length), plus with tp the o_proj and MLP all-reduces
    of ``[B, 1, h]`` (and one for the embedding).  The cache is never gathered.
    """
    check(isinstance(cache, KVCache), CacheError, f"cache must be a KVCache from prefill, got {type(cache).__name__}")
    adapter = adapter_for(model)
    _check_cache(adapter, cache)
    check_tokens(token_ids, cache)
    device = adapter.device
    owner, position = cache.next_owner(), cache.seq_len
    step = DecodeStep(cache, owner, position)
    cache.begin()
    try:
        with torch.no_grad():
            logits = adapter.logits(token_ids.to(device)[:, None], torch.tensor([position], device=device), step)
    except BaseException:
        cache.rollback()
        raise
    cache.commit(owner, position)
    return logits[:, -1]


def _check_cache(adapter: InferenceAdapter, cache: KVCache) -> None:
    """A CacheError (on every rank alike) unless ``cache`` was filled for the adapter's model and mesh."""
    mesh = adapter.mesh
    check(cache.mesh is mesh or (cache.mesh.sp == mesh.sp and cache.mesh.tp == mesh.tp), CacheError,
          f"the cache was filled on {cache.mesh}, but {adapter.name} runs on {mesh}: use the cache from its prefill")
    filled = len(cache.layers) - len(cache.missing())
    check(len(cache.layers) == adapter.num_layers and filled == adapter.num_layers, CacheError,
          f"the cache has {len(cache.layers)} layers for a model of {adapter.num_layers} ({filled} layers filled "
          f"for a model of {adapter.num_layers}): use the cache prefill returned for this model")


def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, mesh: Mesh | None = None,
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
    mesh = adapter_for(model).check_mesh(mesh)
    if max_new_tokens == 0:
        return input_ids.clone()
    cache, logits = prefill(model, input_ids, mesh, strategy, layout=layout, pad=pad, reserve=max_new_tokens)
    new = decode(model, cache, logits, max_new_tokens, sampler=sampler, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id)
    return torch.cat([input_ids.to(new.device), new], dim=1)


def decode(model: Any, cache: KVCache, logits: torch.Tensor, max_new_tokens: int, *,
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
