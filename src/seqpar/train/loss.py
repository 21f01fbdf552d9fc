"""The causal-LM loss of sequence-sharded (and vocab-split) logits: one API, tensors in and out.

The contract: every rank returns ``loss = local_sum * (dp * sp) / global_tokens`` so that
*averaging* gradients over ``mesh.dp_sp_group`` (what DDP and FSDP do, and what
:func:`seqpar.train.sync_gradients` does) gives exactly the gradient of the global token mean,
whatever the split of sequences and tokens.  ``value`` is the global token-mean loss itself.
Labels are shifted *before* sharding (:func:`shift_labels`), so no token loses its target at a
shard edge.

Two entry points share that contract: :func:`causal_lm_loss` takes logits, and
:func:`causal_lm_loss_from_hidden` takes the LM head's input and weight and never materialises
the ``[S/sp, V/t]`` logits (chunked over tokens, recomputed in backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.comm import reduce_in_place
from ..core.errors import ShapeError, check
from ..core.mesh import Mesh, resolve_mesh
from ..tp.cross_entropy import DEFAULT_LOSS_CHUNK, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = ["IGNORE_INDEX", "IGNORE", "shift_labels", "causal_lm_loss", "causal_lm_loss_from_hidden",
           "global_token_mean", "LossOutput", "DEFAULT_LOSS_CHUNK"]

#: label value that takes no part in the loss (PyTorch's and Hugging Face's convention)
IGNORE_INDEX = -100
IGNORE = IGNORE_INDEX


def shift_labels(labels: torch.Tensor, cu_seqlens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets of full (unsharded) ids or HF-style labels ``[B, S]``: ``out[t] = labels[t + 1]``.

    Shift *before* sharding, so no token loses its target at a shard edge.  The last token of
    the sequence, and of every packed document (``cu_seqlens``, flash-attn's convention), has no
    target (``ignore_index``).  No communication.
    """
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    ends = [] if cu_seqlens is None else [int(e) for e in list(cu_seqlens)[1:]]
    for end in ends:
        out[:, end - 1] = ignore_index
    out[:, -1] = ignore_index
    return out


@dataclass
class LossOutput:
    """What :func:`causal_lm_loss` returns; every field is a tensor (nothing is read back to the host)."""

    #: call ``.backward()`` on this: ``local_sum * (dp * sp) / global_tokens``
    loss: torch.Tensor
    #: the global token-mean loss (detached float64 scalar, the same on every rank; 0 without tokens)
    value: torch.Tensor
    #: tokens with a target over every dp x sp rank (float64 scalar)
    tokens: torch.Tensor


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mesh: Mesh | None = None, *,
                   ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """Exact global token-mean cross-entropy of this rank's logits and (already shifted) labels.

    Args:
        logits: ``[B, S_local, V/t]`` this rank's logits, the vocabulary split over ``mesh.tp_group``
            (``t = 1``: whole rows, e.g. a Hugging Face model's ``out.logits``).  Half precision is
            upcast to float32 for the softmax statistics; the vocabulary is never gathered.
        labels: ``[B, S_local]`` targets sharded like the ids (:func:`shift_labels` before sharding;
            not shifted again here), ``ignore_index`` where there is none.
        mesh: the dp x sp x tp mesh (``None``: the default mesh).

    Returns a :class:`LossOutput`.  A global batch without any target gives ``loss`` 0 (with zero
    gradients) and ``value`` 0, never NaN.

    Communication: the vocab-parallel cross entropy's two all-reduces over tp (none for t = 1), and
    one all-reduce of two float64 scalars (loss sum, token count) over ``mesh.dp_sp_group``.  No
    host synchronisation.
    """
    mesh = resolve_mesh(mesh)
    check(logits.dim() >= 2 and tuple(labels.shape) == tuple(logits.shape[:-1]), ShapeError,
          f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without the vocabulary dim: "
          f"shard the shifted labels like the ids")
    labels = labels.to(logits.device)
    ce = vocab_parallel_cross_entropy(logits, labels, group=mesh.tp_group, ignore_index=ignore_index)
    return global_token_mean(ce, labels, mesh, ignore_index=ignore_index)


def causal_lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               mesh: Mesh | None = None, *, chunk: int | None = None, sequence_parallel: bool = False,
                               ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """:func:`causal_lm_loss` of ``hidden @ weight^T`` without ever holding the ``[B, S_local, V/t]`` logits.

    Args:
        hidden: ``[B, S_local, h]`` the LM head's input (after the final norm); with
            ``sequence_parallel`` (Megatron SP over ``mesh.tp_group``) this rank's
            ``[B, S_local/t, h]`` shard, gathered over tp here.
        weight: ``[V/t, h]`` this rank's rows of the LM head (no bias): ``model.lm_head.weight`` of a
            Hugging Face model (t = 1), or of :class:`seqpar.models.LlamaForCausalLM`.
        labels: ``[B, S_local]`` as for :func:`causal_lm_loss`.
        mesh: the dp x sp x tp mesh (``None``: the default mesh).
        chunk: tokens per chunk (default :data:`DEFAULT_LOSS_CHUNK`): at most ``[chunk, V/t]``
            float32 logits exist at once, in forward and in backward (where they are recomputed).

    Returns the same :class:`LossOutput` as :func:`causal_lm_loss` on the logits (equal up to float
    rounding of the chunked matmuls; one chunk holding every token gives the same bits), with
    gradients for ``hidden`` and ``weight``.

    Communication: per chunk two all-reduces of ``chunk`` floats over tp (none for t = 1); with
    ``sequence_parallel`` an all-gather of ``hidden`` over tp (forward and again in backward) and a
    reduce-scatter of its gradient; the same float64 all-reduce over ``mesh.dp_sp_group`` as
    :func:`causal_lm_loss`.  One more LM-head matmul than the logits path (the recomputation).
    """
    mesh = resolve_mesh(mesh)
    labels = labels.to(hidden.device)
    ce = vocab_parallel_linear_cross_entropy(hidden, weight, labels, group=mesh.tp_group,
                                             chunk=DEFAULT_LOSS_CHUNK if chunk is None else chunk,
                                             ignore_index=ignore_index, sequence_parallel=sequence_parallel)
    return global_token_mean(ce, labels, mesh, ignore_index=ignore_index)


def global_token_mean(token_losses: torch.Tensor, labels: torch.Tensor, mesh: Mesh | None = None, *,
                      ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """This module's loss contract from per-token losses (the reduction both loss functions end with).

    Args:
        token_losses: ``[B, S_local]`` per-token losses, 0 where the label is ``ignore_index`` (what
            ``LlamaForCausalLM(ids, labels=...)`` and :func:`seqpar.tp.vocab_parallel_cross_entropy`
            return).
        labels: ``[B, S_local]`` the labels they were computed from (for the token count).

    Returns :class:`LossOutput` (``loss = local_sum * (dp * sp) / global_tokens``).  Communication:
    one all-reduce of two float64 scalars over ``mesh.dp_sp_group``.
    """
    mesh = resolve_mesh(mesh)
    ce = token_losses
    local_sum = ce.sum()
    stats = torch.stack([local_sum.detach().double(), (labels != ignore_index).sum().double()])
    reduce_in_place(stats, mesh.dp_sp_group)
    tokens = stats[1]
    count = tokens.clamp(min=1)
    loss = local_sum * (mesh.dp * mesh.sp / count).to(local_sum.dtype)
    return LossOutput(loss=loss, value=stats[0] / count, tokens=tokens)
