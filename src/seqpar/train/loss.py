"""Training glue: shifted labels, the exact global token-mean loss, gradient reduction over dp x sp.

The loss contract: every rank returns ``loss = local_sum * (dp * sp) / global_tokens`` so that
*averaging* gradients over ``mesh.dp_sp_group`` (what DDP and FSDP do, and what
:func:`sync_gradients` does) gives exactly the gradient of the global token mean, whatever
the split of sequences and tokens.  ``value`` is the global token-mean loss itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core.comm import agreed_grads, all_reduce_coalesced
from ..core.errors import ShapeError, check
from ..core.mesh import Mesh, group_size
from ..core.stats import record_comm
from ..tp import sync_sequence_parallel_grads, vocab_parallel_cross_entropy
from ..tp.mappings import resolve_mesh

__all__ = ["shift_labels", "causal_lm_loss", "LossOutput", "sync_gradients"]

IGNORE = -100


def shift_labels(input_ids: torch.Tensor, cu_seqlens=None, ignore_index: int = IGNORE) -> torch.Tensor:
    """Next-token targets ``[B, S]`` of full (unsharded) ids: ``labels[t] = ids[t + 1]``.

    Shift *before* sharding, so no token loses its target at a shard edge; the last
    token of each document (from ``cu_seqlens``) gets ``ignore_index``.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    for end in ([] if cu_seqlens is None else list(cu_seqlens)[1:]):
        labels[:, int(end) - 1] = ignore_index
    labels[:, -1] = ignore_index
    return labels


@dataclass
class LossOutput:
    loss: torch.Tensor  # call .backward() on this
    value: float  # the global token-mean loss
    tokens: int  # tokens counted over dp x sp


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        record_comm("all_reduce", x.numel() * x.element_size())
        dist.all_reduce(x, group=group)
    return x


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mesh: Mesh | None = None) -> LossOutput:
    """Exact global token-mean cross-entropy of vocab-parallel logits ``[B, S/sp, V/t]`` and local labels.

    Communication: the vocab-parallel cross entropy's all-reduces over tp, and two
    scalar all-reduces over dp x sp (token count, loss value).
    """
    mesh = resolve_mesh(mesh)
    check(labels.shape == logits.shape[:-1], ShapeError,
          f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape[:-1])} (shard the shifted labels "
          f"like the ids)")
    ce = vocab_parallel_cross_entropy(logits, labels, group=mesh.tp_group, reduction="none")
    valid = labels != IGNORE
    local_sum = (ce * valid).sum()
    group = mesh.dp_sp_group
    count = int(_all_reduce(valid.sum().to(torch.float64), group).item())
    check(count > 0, ShapeError, "no token has a target (all labels are ignore_index)")
    total = _all_reduce(local_sum.detach().to(torch.float64).clone(), group)
    return LossOutput(local_sum * (mesh.dp * mesh.sp / count), float(total) / count, count)


def sync_gradients(model: nn.Module, mesh: Mesh | None = None) -> None:
    """After backward: sum sequence-parallel norm grads over tp, then average every grad over dp x sp.

    Call it once per optimizer step, after the last micro-batch's backward when accumulating
    (the sums and the average are not idempotent: a second call would count the gradients
    again).  Use instead of DDP/FSDP's own reduction (not in addition to it).  Gradients are
    coalesced per dtype: one all-reduce each over ``mesh.dp_sp_group``, after one small
    all-reduce that agrees which parameters have a gradient (see :func:`seqpar.comm.agreed_grads`).
    """
    mesh = resolve_mesh(mesh)
    sync_sequence_parallel_grads(model, mesh)
    all_reduce_coalesced(agreed_grads(model.parameters(), mesh.dp_sp_group), mesh.dp_sp_group,
                         divide_by=mesh.dp * mesh.sp)
