"""Memory beyond attention for Hugging Face causal LMs: layer checkpointing with host offload, tiled MLPs,
the loss without logits.

The pieces of :mod:`seqpar.core.recompute` and :func:`seqpar.train.causal_lm_loss_from_hidden`,
fitted to a ``transformers`` decoder-only model (``model.model.layers``, ``layer.mlp``,
``model.lm_head``)::

    hf.apply(model, mesh, strategy="ring", recompute="full", offload=True, mlp_tiles=4)
    local = hf.shard_batch({"input_ids": ids, "labels": ids}, mesh)
    out = hf_memory.model_loss(model, local, mesh, chunk=4096)   # no [S/sp, V] logits
    out.loss.backward()

* ``recompute="full"``: each decoder layer keeps only its input for backward and is replayed
  there (seqpar's own reentrant checkpoint, not HF's: it can offload); ``offload=True`` keeps
  those inputs in host memory, copied asynchronously on CUDA and prefetched one layer ahead.
* ``mlp_tiles=n``: each layer's MLP runs over ``n`` sequence tiles, only one tile's
  ``[tile, intermediate]`` activations alive at a time, recomputed tile by tile in backward.
* :func:`model_loss`: the model's forward with the LM head replaced, for this call, by the
  chunked cross entropy of its input and weight (computed inside the forward, so DDP/FSDP
  wrappers see the weight used): the logits never exist.

Every setting is exact (the same loss and gradients, up to float rounding of tiled sums).
Refused by name: ``recompute="selective"`` (HF's MLP forms its product inside its forward),
``checkpoint_every > 1`` (HF's decoder loop calls each layer itself), HF's own gradient
checkpointing together with ``recompute="full"``, MLPs that are not token-wise tensor maps,
LM heads with a bias, logit soft-capping or scaling.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, check
from ..core.mesh import Mesh, resolve_mesh
from ..core.recompute import MemoryConfig, Offloader, checkpoint, tiled
from ..train.loss import LossOutput, causal_lm_loss_from_hidden

__all__ = ["apply_memory", "model_loss", "memory_config"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP-style wrappers (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    check(isinstance(layers, nn.ModuleList) and len(layers) > 0, ConfigError,
          f"{type(model).__name__}: no decoder layers at model.base_model.layers; seqpar's memory settings "
          f"support decoder-only causal LMs laid out like Llama (model.model.layers[i].mlp)")
    return layers  # type: ignore[return-value]


def memory_config(model: nn.Module) -> MemoryConfig:
    """The settings :func:`apply_memory` put on ``model`` (all off when it was not called)."""
    return getattr(_unwrap(model), "_seqpar_memory", MemoryConfig())


def apply_memory(model: nn.Module, *, recompute: str = "none", offload: bool = False, mlp_tiles: int = 1,
                 checkpoint_every: int = 1) -> MemoryConfig:
    """Install the memory settings on a Hugging Face causal LM (in place; calling again replaces them).

    Args:
        model: a ``transformers`` decoder-only causal LM (``model.model.layers[i].mlp``), usually
            prepared by :func:`seqpar.integrations.hf.apply` (which calls this with its keywords).
        recompute: ``"none"`` or ``"full"`` (each decoder layer replayed in backward from its input).
        offload: with ``"full"``, the layer inputs wait for backward in host memory.
        mlp_tiles: run each layer's MLP over this many sequence tiles (1: off).
        checkpoint_every: must be 1 for HF models.

    Returns the :class:`~seqpar.core.recompute.MemoryConfig`.  No communication.
    """
    mem = MemoryConfig(recompute=recompute, offload=offload, mlp_tiles=mlp_tiles, checkpoint_every=checkpoint_every)
    name = type(model).__name__
    check(mem.recompute != "selective", ConfigError,
          f"{name}: recompute='selective' is implemented for seqpar's own model only (an HF MLP multiplies "
          f"inside its forward); use recompute='full' (with mlp_tiles for the MLP)")
    check(mem.checkpoint_every == 1, ConfigError,
          f"{name}: checkpoint_every={mem.checkpoint_every} needs chains of layers replayed together, which "
          f"HF's decoder loop (one call per layer) does not allow; use checkpoint_every=1")
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"  # the spelling before transformers 5
    hf_ckpt = bool(getattr(model, flag, False))
    check(not (hf_ckpt and mem.recompute == "full"), ConfigError,
          f"{name}: HF's gradient checkpointing is on and recompute='full' would checkpoint every layer a "
          f"second time: call model.gradient_checkpointing_disable() (seqpar's checkpoint can also offload)")
    layers = _decoder_layers(model)
    for layer in layers:
        _restore(layer)
        _restore(getattr(layer, "mlp", layer))
    state = getattr(model, "_seqpar_memory_state", None)
    if state is not None:
        state.remove()
    offloader = Offloader()
    if mem.mlp_tiles > 1:
        for i, layer in enumerate(layers):
            mlp = getattr(layer, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise ConfigError(f"{name}: decoder layer {i} has no .mlp module to tile: use mlp_tiles=1")
            _patch(mlp, _tiled_forward(mlp, mem.mlp_tiles, f"{name}.layers.{i}.mlp"))
    if mem.recompute == "full":
        for layer in layers:
            _patch(layer, _checkpointed_forward(layer, offloader if mem.offload else None))
    base = getattr(model, "base_model", model)
    hook = base.register_forward_pre_hook(lambda module, args: offloader.new_pass())
    # plain attributes: ignored by state_dict
    _set(model, _seqpar_memory=mem, _seqpar_memory_state=hook, _seqpar_offloader=offloader)
    return mem


def _set(module: nn.Module, **attrs: Any) -> None:
    """Plain (non-parameter, non-module) attributes on ``module``."""
    for key, value in attrs.items():
        setattr(module, key, value)


def _patch(module: nn.Module, forward: Any) -> None:
    """Replace ``module.forward`` on this instance (the class's forward stays reachable)."""
    _set(module, _seqpar_forward=module.__dict__.get("forward"), forward=types.MethodType(forward, module))


def _restore(module: nn.Module) -> None:
    if "_seqpar_forward" in module.__dict__:
        old = module.__dict__.pop("_seqpar_forward")
        module.__dict__.pop("forward", None)
        if old is not None:
            _set(module, forward=old)


def _class_forward(module: nn.Module):
    return type(module).forward.__get__(module)


def _tiled_forward(mlp: nn.Module, tiles: int, where: str):
    inner = _class_forward(mlp)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check(not args and not kwargs and isinstance(x, torch.Tensor) and x.dim() == 3, ConfigError,
              f"{where}: mlp_tiles needs an MLP called as mlp(hidden_states [B, S, h]); this one takes other "
              f"arguments (a mixture of experts?): use mlp_tiles=1")

        def run(t: torch.Tensor) -> torch.Tensor:
            y = inner(t)
            check(isinstance(y, torch.Tensor) and y.shape == t.shape, ConfigError,
                  f"{where}: mlp_tiles needs a token-wise MLP returning [B, S, h]; it returned "
                  f"{type(y).__name__}: use mlp_tiles=1")
            return y
        return tiled(run, x, tiles, dim=1, modules=[self])
    return forward


def _checkpointed_forward(layer: nn.Module, offloader: Offloader | None):
    inner = _class_forward(layer)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        def run(h: torch.Tensor):
            return inner(h, *args, **kwargs)
        return checkpoint(run, hidden_states, modules=[self], offloader=offloader)
    return forward


@contextlib.contextmanager
def _head_computes_loss(model: nn.Module, labels: torch.Tensor, mesh: Mesh, chunk: int | None,
                        out: dict[str, LossOutput]) -> Iterator[None]:
    """For one forward, the LM head returns no logits and leaves the chunked loss of its input in ``out``."""
    inner = _unwrap(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    name = type(inner).__name__
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{name}: no linear LM head (get_output_embeddings()) to take the loss from")
    check(head.bias is None, ConfigError, f"{name}: the LM head has a bias, which the chunked loss does not add")
    cfg = getattr(inner, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, key, None)
        check(value in (None, 1, 1.0), ConfigError,
              f"{name}: config.{key}={value} changes the logits after the LM head, which the chunked "
              f"loss does not reproduce: use hf.causal_lm_loss(model(**local).logits, labels, mesh)")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out["loss"] = causal_lm_loss_from_hidden(hidden, self.weight, labels, mesh, chunk=chunk)
        return hidden.new_zeros(hidden.shape[:-1] + (0,))  # no logits

    _set(head, forward=types.MethodType(forward, head))
    try:
        yield
    finally:
        head.__dict__.pop("forward", None)


def model_loss(model: nn.Module, local: Mapping[str, Any], mesh: Mesh | None = None, *,
               chunk: int | None = None) -> LossOutput:
    """The exact global causal-LM loss of a batch from :func:`seqpar.integrations.hf.shard_batch`, without logits.

    Args:
        model: the HF model prepared by :func:`~seqpar.integrations.hf.apply` (or a DDP/FSDP wrapper
            of it); it is called once, through the wrapper.
        local: ``shard_batch``'s output (``labels`` required; ``shift_labels`` is dropped).
        mesh: the mesh given to ``apply`` (default: the default mesh).
        chunk: tokens per loss chunk (default 4096): the most ``[chunk, V]`` float32 logits alive.

    Returns the :class:`~seqpar.train.LossOutput` of :func:`seqpar.train.causal_lm_loss_from_hidden`
    on the final hidden states and ``lm_head.weight`` (the same as ``hf.causal_lm_loss`` on the logits).
    Communication: the model's, and the loss's (one float64 all-reduce over dp x sp).
    """
    mesh = resolve_mesh(mesh)
    batch = dict(local)
    labels = batch.pop("labels", None)
    batch.pop("shift_labels", None)
    check(isinstance(labels, torch.Tensor), ConfigError,
          "model_loss needs the batch's labels: pass shard_batch({'input_ids': ..., 'labels': ...}, mesh)")
    out: dict[str, LossOutput] = {}
    with _head_computes_loss(model, labels, mesh, chunk, out):
        model(**batch)
    check("loss" in out, ConfigError,
          f"{type(_unwrap(model)).__name__}'s forward did not call its LM head (get_output_embeddings())")
    return out["loss"]
