"""Long-context inference: sequence-parallel prefill over a sharded KV cache, decode merged by log-sum-exp.

::

    cache, logits = seqpar.inference.prefill(model, prompt_ids, strategy="ring")  # prompt [B, S] on every rank
    next_logits = seqpar.inference.decode_step(model, cache, token_ids)         # token_ids [B]
    ids = seqpar.inference.generate(model, prompt_ids, max_new_tokens=32)       # greedy, [B, S + 32]

Each sequence-parallel rank keeps the keys/values of its own tokens only; decode
merges the ranks' partial attentions with one small all-gather per layer.  One code path
serves every model, through a small adapter (:mod:`seqpar.inference.adapter`: embed, layers
whose attention calls a cache step, head): :class:`seqpar.models.LlamaForCausalLM`
(:mod:`seqpar.inference.reference`), Hugging Face causal LMs prepared by
:func:`seqpar.integrations.hf.apply` (whose adapter the integration registers:
:mod:`seqpar.integrations.hf_inference`), and any object implementing
:class:`InferenceAdapter`.  See ``docs/inference.md`` for when this pays.
"""
from . import reference  # noqa: F401  (registers the reference model's adapter)
from .adapter import CacheStep, InferenceAdapter, LastToken, adapter_for, register_adapter
from .cache import CacheError, KVCache, LayerCache
from .generate import decode, decode_step, generate, merge_over_group, prefill
from .sampling import Sampler
from .steps import DecodeStep, PrefillStep

__all__ = ["KVCache", "LayerCache", "CacheError", "prefill", "decode_step", "decode", "generate", "merge_over_group",
           "Sampler", "InferenceAdapter", "CacheStep", "LastToken", "PrefillStep", "DecodeStep", "adapter_for",
           "register_adapter"]
