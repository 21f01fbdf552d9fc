"""Communication between tensor-parallel regions (Megatron's ``mappings.py``), built on :mod:`seqpar.comm`.

Every function takes an explicit, already resolved process group (normally
``mesh.tp_group``).  ``None`` or a one-process group means "no tensor
parallelism" and every function is then the identity: unlike the ``group=None``
of :mod:`seqpar.comm` it never falls back to the default *sequence-parallel*
group, which would silently communicate over the wrong ranks.

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
from ..core.comm import _all_gather, _split
from ..core.errors import ShapeError, check
from ..core.mesh import group_size

__all__ = [
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]


def _trivial(group) -> bool:
    return group is None or group_size(group) == 1


def _seq_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    check(x.shape[dim] % n == 0, ShapeError,
          f"{what}: sequence length {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is not divisible by "
          f"the tensor-parallel size {n}, which sequence_parallel=True needs; pad the sequence to a multiple "
          f"of {n} (seqpar.shard pads) or turn sequence_parallel off")


class _GatherSplitGrad(torch.autograd.Function):
    """All-gather along dim; backward keeps this rank's chunk (the gathered tensor is replicated)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity; backward all-reduces the gradient (x feeds every rank's shard of a column-parallel layer)."""
    return x if _trivial(group) else comm.copy_to_group(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the partial results of a row-parallel layer; backward: identity."""
    return x if _trivial(group) else comm.all_reduce(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """``[.., h] -> [.., h/t]``, this rank's chunk of a replicated tensor; backward all-gathers the last dim."""
    return x if _trivial(group) else comm.split(x, -1, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """``[.., h/t] -> [.., h]`` replicated; backward keeps this rank's chunk of the (whole) gradient."""
    if _trivial(group):
        return x
    return _GatherSplitGrad.apply(x, x.dim() - 1, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """``[B, S, h] -> [B, S/t, h]``: enter the sequence-parallel region; backward all-gathers along seq."""
    if _trivial(group):
        return x
    _seq_divisible(x, seq_dim, group_size(group), "scatter_to_sequence_parallel_region")
    return comm.split(x, seq_dim, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1, *,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """``[B, S/t, h] -> [B, S, h]``.

    Backward: reduce-scatter along seq when the gathered tensor feeds tensor-parallel
    compute (each rank then holds only a partial gradient, e.g. a column-parallel
    linear); with ``tensor_parallel_output_grad=False`` (the consumer is replicated,
    each rank holds the whole gradient) just keep this rank's chunk.
    """
    if _trivial(group):
        return x
    if tensor_parallel_output_grad:
        return comm.all_gather(x, seq_dim, group)
    return _GatherSplitGrad.apply(x, seq_dim % x.dim(), group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """``[B, S, h]`` partial sums -> ``[B, S/t, h]`` summed shard; backward all-gathers along seq."""
    if _trivial(group):
        return x
    _seq_divisible(x, seq_dim, group_size(group), "reduce_scatter_to_sequence_parallel_region")
    return comm.reduce_scatter(x, seq_dim, group)
