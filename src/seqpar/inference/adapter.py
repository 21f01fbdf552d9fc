"""The small interface between :mod:`seqpar.inference` and a model: one adapter per kind of model.

:func:`~seqpar.inference.prefill`, :func:`~seqpar.inference.decode_step` and
:func:`~seqpar.inference.generate` are written once, against :class:`InferenceAdapter`.  A
model takes part by running its usual pieces, with one hook:

* **embed** the given token ids (``[B, L]``, this rank's shard of the prompt, or the new token);
* **layers**: every attention layer hands its roped ``q, k, v`` (BSHD) to the
  :class:`CacheStep` it was given, ``step.attend(layer_index, q, k, v, scale=, window=)``, and
  continues with what it returns, instead of attending itself;
* **head**: the logits (of the last prompt token in prefill: see :class:`LastToken`).

The step does the sequence-parallel work (storing the rank's keys and values, attending over
the prompt with a seqpar strategy, or attending the new token to the local shard and merging
over ranks); the adapter never communicates for attention.

Adapters come from :func:`adapter_for`.  An object that implements :class:`InferenceAdapter`
itself is used as it is.  Other models are found through factories registered with
:func:`register_adapter`, so the layers above this package add their models without this
package importing them: :mod:`seqpar.inference.reference` registers
:class:`seqpar.models.LlamaForCausalLM`, and the Hugging Face integration registers the models
prepared by :func:`seqpar.integrations.hf.apply` (:mod:`seqpar.integrations.hf_inference`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..core import comm
from ..core.errors import ConfigError, check
from ..core.mesh import Mesh
from ..core.packing import SeqInfo
from .common import token_owner

__all__ = ["CacheStep", "InferenceAdapter", "LastToken", "register_adapter", "adapter_for"]


class CacheStep(Protocol):
    """What one forward of prefill or decode hands every attention layer of the model."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None, window: int | None = None) -> torch.Tensor:
        """Attention of layer ``layer`` (0-based) for this rank's tokens, their keys and values cached.

        Args:
            q: ``[B, L, H, D]`` roped queries; k, v: ``[B, L, Hkv, D]`` roped keys and values of the
                same ``L`` tokens (this rank's prompt shard in prefill, the new token in decode).
            scale: softmax scale (None = ``1/sqrt(D)``).
            window: the layer's causal sliding window ``W`` (key ``j`` visible to query ``i`` iff
                ``i - W < j <= i``, Hugging Face's convention), None for full attention.
        Returns:
            ``[B, L, H, D]`` in q's dtype.  Collective: every rank calls it for every layer, in order.
        """
        ...


@dataclass(frozen=True)
class LastToken:
    """Where the prompt's last token sits, and how its row reaches every rank (prefill only).

    Attributes:
        index: its index in this rank's shard when this rank holds it (``mine``), else 0.
        mine: this rank holds it (exactly one rank of the sp group, and of the tp group with
            Megatron sequence parallelism, does).
        groups: the process groups to sum over so that every rank gets the owner's row.
    """

    index: int
    mine: bool
    groups: tuple[Any, ...]

    @classmethod
    def of(cls, info: SeqInfo, mesh: Mesh, tp_cut: int = 1) -> LastToken:
        """The last real token of a prompt split as ``info`` over ``mesh.sp_group`` (each shard cut again
        ``tp_cut`` times over the tp group, contiguously, with Megatron sequence parallelism).  No communication."""
        owner, index = token_owner(info, info.seq_len - 1)
        mine = mesh.rank("sp") == owner
        groups: list[Any] = [mesh.sp_group] if info.n > 1 else []
        if tp_cut > 1:
            tp_owner, index = divmod(index, info.local_len // tp_cut)
            mine = mine and mesh.rank("tp") == tp_owner
            groups.append(mesh.tp_group)
        return cls(index if mine else 0, mine, tuple(groups))

    def reduce(self, row: torch.Tensor) -> torch.Tensor:
        """``row [B, 1, ...]`` (the last token's on its owner, anything elsewhere) -> the owner's, on every rank.

        Communication: an all-reduce of ``[B, 1, ...]`` over each of :attr:`groups` (the owner's
        row summed with zeros: exact).
        """
        x = row if self.mine else torch.zeros_like(row)
        for group in self.groups:
            x = comm.all_reduce(x, group)
        return x

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, ...]`` this rank's per-token tensor -> ``[B, 1, ...]`` the last token's, on every rank
        (:meth:`reduce` of the row at :attr:`index`)."""
        return self.reduce(x[:, self.index:self.index + 1])


@runtime_checkable
class InferenceAdapter(Protocol):
    """A causal LM as :mod:`seqpar.inference` drives it (see the module docs).

    Attributes:
        name: what to call the model in messages.
        mesh: the mesh the model runs on (its ``sp_group`` splits the prompt and the cache).
        num_layers: attention layers, i.e. layers of the cache.
        strategy: the default sequence-parallel attention strategy of prefill.
        tp_cut: how many times each sp shard of the prompt is cut again over the tp group
            (``mesh.tp`` with Megatron sequence parallelism, else 1).
        device: where input ids go.
    """

    name: str
    mesh: Mesh
    num_layers: int
    strategy: str
    tp_cut: int
    device: torch.device

    def check_mesh(self, mesh: Mesh | None) -> Mesh:
        """The mesh to run on (``None``: the model's); a ConfigError, before any collective, for one that
        does not fit the model."""
        ...

    def prompt_layout(self, layout: Any, mesh: Mesh) -> Any:
        """The sequence layout (name or object) to split the prompt in: ``layout``, or the model's when None;
        a ConfigError for one the model cannot run."""
        ...

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, step: CacheStep,
               last: LastToken | None = None) -> torch.Tensor:
        """Embed ``input_ids [B, L]``, run every layer (attention through ``step``), and the head.

        Args:
            positions: ``[L]`` global positions of the tokens (for RoPE).
            last: prefill: return the last prompt token's logits only, the same on every rank: the
                adapter takes that token's row with :meth:`LastToken.select` (or :meth:`LastToken.reduce`)
                wherever it is cheapest, before or after the head.  None (decode): every token's.
        Returns:
            ``[B, 1, V/t]`` (prefill) or ``[B, L, V/t]`` (decode) logits, vocabulary split over tp.
        Runs under ``torch.no_grad()``; a collective over the model's mesh.
        """
        ...


#: factories tried in order by adapter_for: each returns an adapter for the models it knows, else None
_FACTORIES: list[Callable[[Any], InferenceAdapter | None]] = []


def register_adapter(factory: Callable[[Any], InferenceAdapter | None]) -> None:
    """Make :func:`adapter_for` try ``factory(model)``: an :class:`InferenceAdapter` for the models it
    knows, None for others (or a ConfigError naming the fix for one it knows but cannot run).
    Registering the same factory again does nothing."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)


def adapter_for(model: Any) -> InferenceAdapter:
    """The :class:`InferenceAdapter` that runs ``model``: itself if it implements one, else the first a
    registered factory returns.  A ConfigError (no communication) for a model nobody knows."""
    if isinstance(model, InferenceAdapter):
        return model
    for factory in _FACTORIES:
        adapter = factory(model)
        if adapter is not None:
            return adapter
    # the Hugging Face integration registers its factory when a model is prepared: none was, in this process
    check(not type(model).__module__.startswith("transformers."), ConfigError,
          f"{type(model).__name__} is a Hugging Face model not prepared for sequence parallelism: call "
          f"seqpar.integrations.hf.apply(model, mesh, strategy=...) first")
    raise ConfigError(f"{type(model).__name__} is not a model seqpar.inference can drive: it drives "
                      f"seqpar.models.LlamaForCausalLM (its per-layer cache hook) or a Hugging Face causal LM "
                      f"prepared by seqpar.integrations.hf.apply, or any object implementing "
                      f"seqpar.inference.InferenceAdapter")
