"""Communication between tensor-parallel regions (Megatron's ``mappings.py``), built on :mod:`seqpar.comm`.

Every function takes the tensor-parallel process group (normally ``mesh.tp_group``).
``group=None`` means what it means at every public call of seqpar: the default mesh's
group of this kind, here its *tensor-parallel* group (:func:`seqpar.mesh.resolve_group`
with ``name="tp"``), resolved on entry.  A one-process group (:data:`seqpar.mesh.SINGLE`,
what ``mesh.tp_group`` is at tp=1) means no tensor parallelism: every function is then
the identity.

Gradient convention (Megatron's): a tensor replicated over the tp group carries
the *whole* gradient on every rank, a sharded tensor carries the gradient of
its own shard.

=====================================  ===================================  ============================
function                               forward                              backward
=====================================  ===================================  ============================
copy_to_tensor_parallel_region         identity                             all-reduce
reduce_from_tensor_parallel_region     all-reduce                           identity
scatter_to_tensor_parallel_region      keep own chunk of last dim           all-gather last dim
gather_from_tensor_parallel_region     all-gather last dim                  keep own chunk
scatter_to_sequence_parallel_region    keep own chunk of seq                all-gather seq
gather_from_sequence_parallel_region   all-gather seq                       reduce-scatter seq (or split)
reduce_scatter_to_sequence_parallel    reduce-scatter seq                   all-gather seq
=====================================  ===================================  ============================
"""
from __future__ import annotations

import torch

from ..core import comm
from ..core.comm import all_gather_tensor, split_tensor
from ..core.errors import ShapeError, check
from ..core.mesh import group_size, resolve_group

__all__ = [
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "check_seq_divisible", "tp_group",
]


def tp_group(group):
    """The tensor-parallel group a call means: ``group``, or the default mesh's tp group for None."""
    return resolve_group(group, name="tp")


def _trivial(group) -> bool:
    return group_size(group) == 1


def check_seq_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    """Raise a ShapeError naming ``what`` unless dim ``dim`` of ``x`` splits over ``n`` tp ranks.

    Megatron sequence parallelism cuts each sequence-parallel shard again over the tp group.
    """
    check(x.shape[dim] % n == 0, ShapeError,
          f"{what}: sequence length {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is not divisible by "
          f"the tensor-parallel size {n}, which sequence_parallel=True needs; pad the sequence to a multiple "
          f"of {n} (seqpar.shard pads) or turn sequence_parallel off")


class _GatherSplitGrad(torch.autograd.Function):
    """All-gather along dim; backward keeps this rank's chunk (the gathered tensor is replicated)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_tensor(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return split_tensor(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity; backward all-reduces the gradient (x feeds every rank's shard of a column-parallel layer)."""
    group = tp_group(group)
    return x if _trivial(group) else comm.copy_to_group(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum the partial results of a row-parallel layer; backward: identity."""
    group = tp_group(group)
    return x if _trivial(group) else comm.all_reduce(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[.., h] -> [.., h/t]``, this rank's chunk of a replicated tensor; backward all-gathers the last dim."""
    group = tp_group(group)
    return x if _trivial(group) else comm.split(x, -1, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[.., h/t] -> [.., h]`` replicated; backward keeps this rank's chunk of the (whole) gradient."""
    group = tp_group(group)
    if _trivial(group):
        return x
    return _GatherSplitGrad.apply(x, x.dim() - 1, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None, seq_dim: int = 1) -> torch.Tensor:
    """``[B, S, h] -> [B, S/t, h]``: enter the sequence-parallel region; backward all-gathers along seq."""
    group = tp_group(group)
    if _trivial(group):
        return x
    check_seq_divisible(x, seq_dim, group_size(group), "scatter_to_sequence_parallel_region")
    return comm.split(x, seq_dim, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group=None, seq_dim: int = 1, *,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """``[B, S/t, h] -> [B, S, h]``.

    Backward: reduce-scatter along seq when the gathered tensor feeds tensor-parallel
    compute (each rank then holds only a partial gradient, e.g. a column-parallel
    linear); with ``tensor_parallel_output_grad=False`` (the consumer is replicated,
    each rank holds the whole gradient) just keep this rank's chunk.
    """
    group = tp_group(group)
    if _trivial(group):
        return x
    if tensor_parallel_output_grad:
        return comm.all_gather(x, seq_dim, group)
    return _GatherSplitGrad.apply(x, seq_dim % x.dim(), group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None, seq_dim: int = 1) -> torch.Tensor:
    """``[B, S, h]`` partial sums -> ``[B, S/t, h]`` summed shard; backward all-gathers along seq."""
    group = tp_group(group)
    if _trivial(group):
        return x
    check_seq_divisible(x, seq_dim, group_size(group), "reduce_scatter_to_sequence_parallel_region")
    return comm.reduce_scatter(x, seq_dim, group)
