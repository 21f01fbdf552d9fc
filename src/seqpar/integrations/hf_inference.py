"""Sequence-parallel inference for Hugging Face causal LMs prepared by :func:`seqpar.integrations.hf.apply`.

::

    mesh = seqpar.init(sp=4)
    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16).eval()
    hf.apply(model, mesh, strategy="ring")                    # the same call as for training
    ids = seqpar.inference.generate(model, prompt, max_new_tokens=64)   # prompt [B, S] on every rank

:func:`seqpar.inference.prefill`, ``decode_step`` and ``generate`` are written once, against
:class:`seqpar.inference.InferenceAdapter`; this module is the Hugging Face models' adapter
(:class:`HFAdapter`), which :func:`~seqpar.integrations.hf.apply` registers with
:func:`seqpar.inference.register_adapter` (the integration sits above inference in the
package's layers, so inference never imports it).  The scheme is the reference model's
(``docs/inference.md``): the prompt runs sequence-parallel, each rank caches the keys/values of
its own tokens, and decode merges the ranks' partial attentions by log-sum-exp with one small
all-gather per layer.

How it plugs into transformers.  No ``transformers.Cache`` is involved: the model runs
with ``use_cache=False``, so each attention module hands the registered ``"seqpar"``
attention function (:func:`~seqpar.integrations.hf.hf_attention`) the roped q/k/v of exactly
the tokens it was given.  seqpar's cache step travels as a keyword (``seqpar_cache``) that HF
forwards from ``model(...)`` down to that function, which calls
``step.attend(module.layer_idx, q, k, v, scale=, window=)`` with the layer's sliding window
(:class:`~seqpar.inference.CacheStep`).  The embedding, the decoder layers and the head are the
model's own, run by its own ``forward``: the head in particular (Gemma's final soft-capping,
Cohere's or Granite's logit scales) is never re-implemented here, so prefill asks the model for
the logits of one position (``logits_to_keep``) and sums that ``[B, V]`` row over sp.

This keeps the integration independent of the Cache API (which changed between
transformers 4.53 and 5.x), and HF never holds, gathers or pads the cache.  RoPE comes
from the ``position_ids`` passed here (the global positions), so HF's own
``cache_position`` bookkeeping is never needed.  Use these functions instead of
``model.generate``, whose mask and cache logic assume one device holds the sequence.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, check
from ..core.layout import resolve_layout
from ..core.mesh import Mesh
from ..inference import CacheStep, LastToken, register_adapter
from .hf import CACHE_KEY, HFSettings, settings

__all__ = ["HFAdapter"]


class HFAdapter:
    """:class:`seqpar.inference.InferenceAdapter` of a Hugging Face causal LM prepared by apply()."""

    def __init__(self, model: nn.Module, s: HFSettings):
        self.model, self.settings = model, s
        self.name, self.mesh, self.strategy = s.name, s.mesh, s.strategy
        self.tp_cut = 1  # the integration shards no weights
        self.num_layers = _num_layers(model)
        self.device = _input_device(model)

    def check_mesh(self, mesh: Mesh | None) -> Mesh:
        """The mesh the model was prepared on; ``mesh``, when given, must be that one."""
        s = self.settings
        check(mesh is None or mesh is s.mesh or (mesh.sp == s.mesh.sp and mesh.dp == s.mesh.dp), ConfigError,
              f"mesh {mesh} is not the one {s.name} was prepared on ({s.mesh}): pass the mesh given to "
              f"seqpar.integrations.hf.apply, or leave mesh=None")
        return s.mesh

    def prompt_layout(self, layout: Any, mesh: Mesh) -> Any:
        """apply()'s layout (resolved on ``mesh``); ``layout``, when given, must be that one."""
        s, group = self.settings, mesh.sp_group
        applied = resolve_layout(s.layout, group, mesh)
        check(layout is None or resolve_layout(layout, group, mesh) == applied, ConfigError,
              f"{s.name} was prepared with layout={s.layout!r}; prefill cannot use layout={layout!r}: leave "
              f"layout=None or call seqpar.integrations.hf.apply(model, mesh, layout={layout!r})")
        return applied

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, step: CacheStep,
               last: LastToken | None = None) -> torch.Tensor:
        """The model's forward with the cache step as ``seqpar_cache``; see InferenceAdapter.logits.

        Prefill asks for the logits of one position only (the last prompt token on the rank that
        holds it) and sums that row over sp: ``[B, 1, V]`` on every rank.
        Communication: attention's (through the step), and in prefill one all-reduce of ``[B, 1, V]``.
        """
        pos = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        if last is None:
            return self.model(input_ids=input_ids, position_ids=pos, **{CACHE_KEY: step}).logits
        keep = torch.tensor([last.index], device=input_ids.device)
        out = self.model(input_ids=input_ids, position_ids=pos, logits_to_keep=keep, **{CACHE_KEY: step})
        return last.reduce(out.logits[:, -1:])


def _num_layers(model: nn.Module) -> int:
    """Decoder layers of an HF model (composite configs keep them in their text config)."""
    config: Any = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"{type(model).__name__}'s config names no num_hidden_layers: seqpar inference cannot "
                          f"size its cache")
    return n


def _input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the input embedding's weight."""
    get: Any = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"{type(model).__name__} has no input embedding weight (get_input_embeddings): seqpar "
                          f"inference drives causal LMs that embed token ids")
    return weight.device


def adapter(model: Any) -> HFAdapter | None:
    """The adapter of a model prepared by apply(); None for other models (a ConfigError for a Hugging
    Face model apply() has not prepared)."""
    s = settings(model)
    return HFAdapter(model, s) if s is not None else None


register_adapter(adapter)
