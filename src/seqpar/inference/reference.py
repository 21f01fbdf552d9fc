"""The inference adapter of seqpar's reference model, :class:`seqpar.models.LlamaForCausalLM`.

The model's pieces map one to one onto :class:`~seqpar.inference.adapter.InferenceAdapter`:
``embed``, then its blocks, whose attention calls a per-layer cache hook (``cache[i](q, k, v)``,
here the :class:`~seqpar.inference.adapter.CacheStep` bound to layer ``i``) instead of
:func:`seqpar.attention`, then ``norm`` and ``lm_head``.

Tensor parallelism: heads are split over tp as in training; the cache holds ``Hkv/t`` heads per
rank.  A single token cannot be cut along the sequence for Megatron sequence parallelism, so
decode (and the last-token head of prefill) runs the tp modules in their replicated mode
(:func:`replicated_tp`): column-parallel q/k/v, then o_proj's and the MLP's all-reduce.
Prefill keeps sequence parallelism; the last prompt token's hidden state (``[B, 1, h]``) is
summed over sp (and tp) from the rank holding it, and only then goes through the head: the
hidden state is smaller than the vocabulary.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, check
from ..core.mesh import Mesh
from ..models import LlamaForCausalLM
from ..tp import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .adapter import CacheStep, LastToken, register_adapter

__all__ = ["LlamaAdapter", "replicated_tp"]

#: the tensor-parallel modules whose forward communicates differently with sequence parallelism
_SEQUENCE_PARALLEL_MODULES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


@contextlib.contextmanager
def replicated_tp(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s tp modules with ``sequence_parallel=False`` inside the block (a 1-token input cannot
    be split over tp): the embedding's and row-parallel outputs are all-reduced instead of reduce-scattered,
    and column-parallel inputs are not gathered.  Restored on exit.  Nothing to do without tensor parallelism."""
    flipped = [m for m in model.modules()
               if isinstance(m, _SEQUENCE_PARALLEL_MODULES) and m.sequence_parallel and m.tp_size > 1]
    for m in flipped:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in flipped:
            m.sequence_parallel = True


class LlamaAdapter:
    """:class:`~seqpar.inference.adapter.InferenceAdapter` of a :class:`~seqpar.models.LlamaForCausalLM`."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self.name = type(model).__name__
        self.mesh: Mesh = model.mesh
        self.num_layers = len(model.layers)
        self.strategy: str = model.strategy
        self.tp_cut: int = model.mesh.tp if model.sequence_parallel else 1
        self.device: torch.device = model.embed.weight.device

    def check_mesh(self, mesh: Mesh | None) -> Mesh:
        """``mesh`` (default: the model's), which must have the model's sp and tp degrees."""
        mesh = mesh if mesh is not None else self.mesh
        check(mesh.sp == self.mesh.sp and mesh.tp == self.mesh.tp, ConfigError,
              f"mesh {mesh} does not match the model's {self.mesh}: build the model on the mesh you infer with")
        return mesh

    def prompt_layout(self, layout: Any, mesh: Mesh) -> Any:
        """``layout``, or the model's (any layout works: the prompt is sharded here)."""
        return layout if layout is not None else self.model.layout

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, step: CacheStep,
               last: LastToken | None = None) -> torch.Tensor:
        """Embed, every block (attention through ``step``), norm and head; see InferenceAdapter.logits.

        Communication: the blocks' (tp's collectives with or without sequence parallelism), and in
        prefill one all-reduce of the last token's ``[B, 1, h]`` hidden state over sp (and tp).
        """
        model = self.model
        hooks = [functools.partial(step.attend, i) for i in range(self.num_layers)]
        if last is None:  # decode: one token, replicated over tp
            with replicated_tp(model):
                return model(input_ids, position_ids=positions, cache=hooks)
        # prefill: RoPE positions are the global ones (padding continues them, masked anyway)
        h = model.hidden_states(input_ids, position_ids=positions, cache=hooks)
        x = last.select(h)  # [B, 1, h] on every rank
        with replicated_tp(model):
            return model.lm_head(model.norm(x))


def _factory(model: Any) -> LlamaAdapter | None:
    return LlamaAdapter(model) if isinstance(model, LlamaForCausalLM) else None


register_adapter(_factory)
