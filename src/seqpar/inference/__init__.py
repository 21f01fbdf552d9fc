"""Long-context inference: sequence-parallel prefill over a sharded KV cache, decode merged by log-sum-exp.

::

    cache, logits = seqpar.inference.prefill(model, prompt_ids, strategy="ring")  # prompt [B, S] on every rank
    next_logits = seqpar.inference.decode_step(model, cache, token_ids)         # token_ids [B]
    ids = seqpar.inference.generate(model, prompt_ids, max_new_tokens=32)       # greedy, [B, S + 32]

Each sequence-parallel rank keeps the keys/values of its own tokens only; decode
merges the ranks' partial attentions with one small all-gather per layer.  Works with
:class:`seqpar.models.LlamaForCausalLM` and with Hugging Face causal LMs prepared by
:func:`seqpar.integrations.hf.apply` (:mod:`seqpar.inference.hf`).  See
``docs/inference.md`` for when this pays.
"""
from .cache import CacheError, KVCache, LayerCache
from .generate import decode, decode_step, generate, merge_over_group, prefill
from .sampling import Sampler

__all__ = ["KVCache", "LayerCache", "CacheError", "prefill", "decode_step", "decode", "generate", "merge_over_group",
           "Sampler"]
