"""Cross entropy over vocabulary-sharded logits, without ever gathering them.

With a vocab-parallel LM head the logits are ``[B, S, V/t]`` per rank; gathering
them would cost ``B*S*V`` elements per rank (the largest activation of an LLM).
Instead the softmax statistics are reduced: two all-reduces of ``[B, S]``
tensors (the max, then the target logit and the sum of exponentials together).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.comm import reduce_in_place
from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import group_rank, group_size
from ..core.stats import record_comm

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_argmax"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss ``logsumexp(z) - z[target]`` from vocab shards; backward ``softmax(z) - onehot(target)``.

    Forward: all-reduce(max) + one all-reduce(sum) of ``[2, *tokens]``.  Backward: no communication
    (each rank's softmax shard and its part of the one-hot are local).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, group) -> torch.Tensor:
        n = group_size(group)
        v = logits.shape[-1]
        start = group_rank(group) * v
        # half precision logits: do the softmax statistics in float32 (as Megatron does)
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        zmax = z.amax(dim=-1)
        if n > 1:
            reduce_in_place(zmax, group, "max")
        z = z - zmax.unsqueeze(-1)  # a new tensor: exponentiated in place below
        valid = target != ignore_index
        local = target.long() - start
        own = valid & (local >= 0) & (local < v)  # the target logit lives on this rank
        idx = local.masked_fill(~own, 0).unsqueeze(-1)
        picked = z.gather(-1, idx).squeeze(-1).masked_fill(~own, 0.0)
        exp = z.exp_()
        stats = torch.stack([picked, exp.sum(dim=-1)])
        if n > 1:
            reduce_in_place(stats, group)
        picked, sum_exp = stats[0], stats[1]
        loss = (torch.log(sum_exp) - picked).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, own, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, idx, own, valid = ctx.saved_tensors
        g = grad_loss.to(softmax.dtype).masked_fill(~valid, 0.0)  # ignored tokens: no gradient
        grad = softmax * g.unsqueeze(-1)  # out of place: softmax stays valid for a retained graph
        grad.scatter_add_(-1, idx, (-g).masked_fill(~own, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, *, group,
                                 ignore_index: int = -100, reduction: str = "none") -> torch.Tensor:
    """``F.cross_entropy`` of logits split on the vocabulary dim over ``group``.

    Args:
        logits_shard: ``[..., V/t]``, rank r holding classes ``[r*V/t, (r+1)*V/t)`` (the output of a
            ``ColumnParallelLinear`` LM head, or ``VocabParallelEmbedding`` rows used as one).
        target: ``[...]`` global class ids (the same on every rank of ``group``); ``ignore_index``
            entries get zero loss and zero gradient.
        group: the tensor-parallel process group (``mesh.tp_group``); ``None`` means a single rank
            (no communication) -- it does *not* mean the default mesh's group.
        reduction: ``"none"`` (``[...]``), ``"sum"``, or ``"mean"`` over the non-ignored tokens
            (NaN when all are ignored, like ``F.cross_entropy``).

    Returns the loss in at least float32 (half-precision logits are upcast for the statistics);
    the gradient comes back in the logits' dtype.  Every rank returns the same loss.
    Communication: 2 all-reduces of token-sized tensors forward, none backward.
    """
    check(reduction in ("none", "sum", "mean"), ConfigError,
          f"reduction={reduction!r}: use 'none', 'sum' or 'mean'")
    check(logits_shard.dim() >= 1 and logits_shard.is_floating_point(), ShapeError,
          f"logits must be a floating tensor [..., V/t], got {tuple(logits_shard.shape)} {logits_shard.dtype}")
    check(tuple(target.shape) == tuple(logits_shard.shape[:-1]), ShapeError,
          f"target shape {tuple(target.shape)} must equal the logits shape without the vocab dim "
          f"{tuple(logits_shard.shape[:-1])}")
    check(not target.is_floating_point(), ShapeError, f"target must hold integer class ids, got {target.dtype}")
    vocab = logits_shard.shape[-1] * group_size(group)
    if target.device.type == "cpu":  # on accelerators this would synchronise with the host: unchecked
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        check(not bool(bad.any()), ShapeError,
              f"target ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    loss = _VocabParallelCrossEntropy.apply(logits_shard, target, ignore_index, group)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


def vocab_parallel_argmax(logits_shard: torch.Tensor, *, group) -> torch.Tensor:
    """``argmax`` over the vocabulary of logits split on their last dim over ``group`` -> ``[...]`` class ids.

    Ties resolve to the lowest class id, as ``torch.argmax`` on the full logits.
    Communication: one all-gather of the per-rank maxima and indices (2 values per token).
    """
    value, index = logits_shard.max(dim=-1)
    n = group_size(group)
    if n == 1:
        return index
    index = index + group_rank(group) * logits_shard.shape[-1]
    pair = torch.stack([value.to(torch.float64), index.to(torch.float64)])
    gathered = [torch.empty_like(pair) for _ in range(n)]
    record_comm("all_gather", pair.numel() * pair.element_size() * (n - 1))
    dist.all_gather(gathered, pair.contiguous(), group=group)
    both = torch.stack(gathered)  # [n, 2, ...]
    best = both[:, 0].argmax(dim=0, keepdim=True)  # first (lowest-rank) maximum
    return both[:, 1].gather(0, best).squeeze(0).long()
