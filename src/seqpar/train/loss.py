"""The causal-LM loss of sequence-sharded (and vocab-split) logits: one API, tensors in and out.

The contract: every rank returns ``loss = local_sum * (dp * sp) / global_tokens`` so that
*averaging* gradients over ``mesh.dp_sp_group`` (what DDP and FSDP do, and what
:func:`seqpar.train.sync_gradients` does) gives exactly the gradient of the global token mean,
whatever the split of sequences and tokens.  ``value`` is the global token-mean loss itself.
Labels are shifted *before* sharding (:func:`shift_labels`), so no token loses its target at a
shard edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.comm import reduce_in_place
from ..core.errors import ShapeError, check
from ..core.mesh import Mesh, resolve_mesh
from ..tp.cross_entropy import vocab_parallel_cross_entropy

__all__ = ["IGNORE_INDEX", "IGNORE", "shift_labels", "causal_lm_loss", "LossOutput"]

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
    local_sum = ce.sum()
    stats = torch.stack([local_sum.detach().double(), (labels != ignore_index).sum().double()])
    reduce_in_place(stats, mesh.dp_sp_group)
    tokens = stats[1]
    count = tokens.clamp(min=1)
    loss = local_sum * (mesh.dp * mesh.sp / count).to(local_sum.dtype)
    return LossOutput(loss=loss, value=stats[0] / count, tokens=tokens)
