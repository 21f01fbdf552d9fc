"""Norms on sequence shards, and the gradient sync their replicated parameters need.

In Megatron sequence parallelism a LayerNorm/RMSNorm runs on this rank's
``[B, S/t, h]`` tokens: the computation is plain and local (it is per token),
but the weight is replicated over the tp group and each rank only sees S/t of
the tokens, so its gradient is a partial sum.  Such parameters are marked
``param.sequence_parallel = True`` and :func:`sync_sequence_parallel_grads`
sums their gradients over the tp group.

When to call it: once per optimizer step, after the last micro-batch's
``loss.backward()`` when accumulating (the in-place sum is not idempotent: a call
after every micro-batch would count the earlier micro-batches again), and before
gradient clipping and ``optimizer.step()``.

Other replicated parameters: over the *sequence-parallel* group (ring/ulysses,
``mesh.sp_group``) and the data-parallel group every rank also sees different
tokens, so every parameter's gradient (sharded or not, marked or not) must in
addition be summed/averaged over ``mesh.dp_sp_group``, as data parallelism does
(DDP/FSDP over that group, or an explicit all-reduce).  That is the model's or
trainer's job; this function only covers the tensor-parallel part.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.comm import agreed_grads, all_reduce_coalesced
from ..core.mesh import Mesh, group_size, resolve_mesh
from ._base import deepcopy_keeping_marks

__all__ = ["LayerNorm", "RMSNorm", "sync_sequence_parallel_grads", "mark_sequence_parallel"]


def mark_sequence_parallel(module: nn.Module, flag: bool = True) -> nn.Module:
    """Set ``p.sequence_parallel = flag`` on every parameter of ``module`` (e.g. a custom norm); returns it.

    Note ``copy.deepcopy`` drops parameter attributes; seqpar's own modules keep them, others must re-mark.
    """
    for p in module.parameters():
        setattr(p, "sequence_parallel", flag)  # noqa: B010  (a mark on nn.Parameter, unknown to its type)
    return module


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dims of ``[B, S/t, h]`` sequence shards (no communication).

    ``sequence_parallel=True`` (default) marks weight and bias for :func:`sync_sequence_parallel_grads`;
    pass False when the input is replicated over the tp group (then every tp rank already
    computes the whole gradient and summing would multiply it by t).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, sequence_parallel: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dtype=dtype, device=device)
        self.sequence_parallel = sequence_parallel
        mark_sequence_parallel(self, sequence_parallel)

    def __deepcopy__(self, memo: dict) -> LayerNorm:
        return deepcopy_keeping_marks(self, memo)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over ``[B, S/t, h]`` sequence shards (no communication); parameters marked as in LayerNorm."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, *,
                 sequence_parallel: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, dtype=dtype, device=device)
        self.sequence_parallel = sequence_parallel
        mark_sequence_parallel(self, sequence_parallel)

    def __deepcopy__(self, memo: dict) -> RMSNorm:
        return deepcopy_keeping_marks(self, memo)


def sync_sequence_parallel_grads(model: nn.Module | Iterable[torch.nn.Parameter], mesh: Mesh | None = None) -> int:
    """Sum over ``mesh.tp_group`` the ``.grad`` of every parameter marked ``sequence_parallel``.

    Call once per optimizer step, after backward, before clipping and the optimizer step (see
    the module docstring).  Every tp rank must call it with the same marked parameters; one
    that has a gradient on some tp ranks only gets zeros where it has none.
    Gradients are coalesced per (dtype, device) into one flat buffer: one all-reduce each.
    No-op (no communication) when tp is 1.  Returns the number of gradients synced.
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    group = resolve_mesh(mesh).tp_group
    grads = agreed_grads([p for p in params if getattr(p, "sequence_parallel", False)], group)
    if group_size(group) == 1 or not grads:
        return len(grads)
    all_reduce_coalesced(grads, group)
    return len(grads)
