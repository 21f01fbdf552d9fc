"""Integrations of seqpar with other libraries.

* :mod:`seqpar.integrations.hf`: sequence-parallel training of stock Hugging Face
  ``transformers`` causal LMs (Llama, Mistral, Qwen2, Qwen3, ...): a seqpar
  attention function registered through transformers' ``AttentionInterface``,
  batch sharding (:func:`~seqpar.integrations.hf.shard_batch`) and the exact
  global token-mean loss (:func:`~seqpar.integrations.hf.causal_lm_loss`).
* :mod:`seqpar.integrations.hf_inference`: the same models' adapter for :mod:`seqpar.inference`
  (sequence-parallel prefill and decode with a sharded KV cache), registered by
  :func:`~seqpar.integrations.hf.apply`: the integration sits above inference, so inference
  never imports it.

Nothing here imports an optional dependency at import time: ``transformers`` is
imported when a model is prepared (:func:`seqpar.integrations.hf.apply`).
"""
from __future__ import annotations

__all__ = ["hf"]  # import it as `from seqpar.integrations import hf`
