"""Cross entropy over vocabulary-sharded logits, without ever gathering them.

With a vocab-parallel LM head the logits are ``[B, S, V/t]`` per rank; gathering
them would cost ``B*S*V`` elements per rank (the largest activation of an LLM).
Instead the softmax statistics are reduced: two all-reduces of ``[B, S]``
tensors (the max, then the target logit and the sum of exponentials together).

Even unsplit, the float32 logits of a long sequence outgrow everything else a rank keeps
(Llama 3 8B at 128K tokens per rank: 67 GB).  :func:`vocab_parallel_linear_cross_entropy`
fuses the LM head into the loss and runs it over token chunks: only one chunk's
``[chunk, V/t]`` logits exist at a time, in forward and in backward, where each chunk's
logits are recomputed from the saved hidden states and the per-token log-sum-exp
(the technique of Liger's fused linear cross entropy and of Cut Cross Entropy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core import comm
from ..core.comm import reduce_in_place
from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import group_rank, group_size
from ..core.stats import record_comm

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_parallel_argmax",
           "DEFAULT_LOSS_CHUNK"]

#: tokens per chunk of :func:`vocab_parallel_linear_cross_entropy` when none is given: Llama 3's 128K
#: vocabulary then keeps 2 GB of float32 logits alive per chunk at tp=1, whatever the sequence length
DEFAULT_LOSS_CHUNK = 4096


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of ``hidden @ weight^T`` (vocab split over ``group``), one token chunk at a time.

    Forward keeps per chunk only its ``[chunk, V/t]`` float32 logits, and saves the hidden states
    (this rank's shard), the targets and two float32 statistics per token (max and sum of
    exponentials).  Backward recomputes each chunk's logits, turns them into
    ``softmax - onehot`` exactly as the unchunked loss does, and accumulates the weight gradient
    over the chunks (in float32 for half-precision weights).

    Communication, ``group`` of t ranks: forward, per chunk, all-reduce(max) and one all-reduce of
    ``[2, chunk]``; with ``gather`` (Megatron SP: ``hidden`` is this rank's sequence shard) one
    all-gather of the hidden states forward and again in backward, and a reduce-scatter of their
    gradient; without it (t > 1) one all-reduce of the hidden-state gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                chunk: int, group, gather: bool) -> torch.Tensor:
        x = _gathered(hidden, group, gather).reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        stats = torch.empty(2, t.numel(), dtype=acc, device=x.device)  # rows: max, sum of exponentials
        out = torch.empty(target.shape, dtype=acc, device=x.device)  # returned as is, not as a view
        loss = out.view(-1)
        start = group_rank(group) * weight.shape[0]
        for a in range(0, t.numel(), chunk):
            b = min(a + chunk, t.numel())
            z = F.linear(x[a:b], weight).to(acc)  # the chunk's logits: the only [chunk, V/t] tensor alive
            zmax = z.amax(dim=-1)
            if group_size(group) > 1:
                reduce_in_place(zmax, group, "max")
            z.sub_(zmax.unsqueeze(-1))  # z is this chunk's own tensor (a fresh matmul output or its upcast)
            valid, own, idx = _target_index(t[a:b], start, weight.shape[0], ignore_index)
            picked = z.gather(-1, idx).squeeze(-1).masked_fill(~own, 0.0)
            part = torch.stack([picked, z.exp_().sum(dim=-1)])
            del z
            if group_size(group) > 1:
                reduce_in_place(part, group)
            loss[a:b] = (torch.log(part[1]) - part[0]).masked_fill(~valid, 0.0)
            stats[0, a:b], stats[1, a:b] = zmax, part[1]
        ctx.save_for_backward(hidden, weight, target, stats)
        ctx.ignore_index, ctx.chunk, ctx.group, ctx.gather = ignore_index, chunk, group, gather
        return out

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, target, stats = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        group, chunk = ctx.group, ctx.chunk
        full = _gathered(hidden, group, ctx.gather)
        x = full.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        acc = stats.dtype
        g_all = grad_loss.reshape(-1).to(acc)
        start = group_rank(group) * weight.shape[0]
        grad_x = torch.empty_like(x) if need_x else None
        # half-precision weights: the chunks' contributions add up in float32, then round once
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        part = None if grad_w is None or weight.dtype == acc else torch.empty_like(weight)
        for a in range(0, t.numel(), chunk):
            b = min(a + chunk, t.numel())
            valid, own, idx = _target_index(t[a:b], start, weight.shape[0], ignore_index=ctx.ignore_index)
            g = g_all[a:b].masked_fill(~valid, 0.0)
            z = F.linear(x[a:b], weight).to(acc)
            # softmax exactly as the unchunked loss computes it: exp(z - max) / sum
            z.sub_(stats[0, a:b].unsqueeze(-1)).exp_().div_(stats[1, a:b].unsqueeze(-1))
            z.mul_(g.unsqueeze(-1)).scatter_add_(-1, idx, (-g).masked_fill(~own, 0.0).unsqueeze(-1))
            gz = z.to(weight.dtype)
            del z
            if grad_x is not None:
                torch.matmul(gz, weight, out=grad_x[a:b])
            if grad_w is not None:
                if part is None:
                    grad_w.addmm_(gz.t(), x[a:b])
                else:
                    grad_w.add_(torch.matmul(gz.t(), x[a:b], out=part))
            del gz  # before the next chunk's logits exist
        grad_h = None
        if grad_x is not None:
            grad_x = grad_x.view(full.shape)
            if group_size(group) > 1:
                grad_x = comm.reduce_scatter(grad_x, 1, group) if ctx.gather else comm.all_reduce(grad_x, group)
            grad_h = grad_x.to(hidden.dtype)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def _gathered(hidden: torch.Tensor, group, gather: bool) -> torch.Tensor:
    """The hidden states of every token this rank's vocabulary shard scores: gathered over tp along dim 1."""
    return comm.all_gather(hidden, 1, group) if gather and group_size(group) > 1 else hidden


def _target_index(t: torch.Tensor, start: int, v: int, ignore_index: int):
    """(valid, own, idx): a target exists; it lives in this rank's vocabulary slice; its local column."""
    valid = t != ignore_index
    local = t.long() - start
    own = valid & (local >= 0) & (local < v)
    return valid, own, local.masked_fill(~own, 0).unsqueeze(-1)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                        group, chunk: int = DEFAULT_LOSS_CHUNK, ignore_index: int = -100,
                                        sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token ``F.cross_entropy(hidden @ weight^T, target)`` without materialising the logits.

    Args:
        hidden: ``[B, S, h]`` the LM head's input (the final norm's output); with
            ``sequence_parallel`` this rank's ``[B, S/t, h]`` sequence shard of the tp group's tokens
            (Megatron SP), all-gathered here along dim 1.
        weight: ``[V/t, h]`` this rank's rows of the LM head (class ids ``[r*V/t, (r+1)*V/t)``), e.g.
            ``ColumnParallelLinear.weight`` or a tied ``VocabParallelEmbedding.weight``; no bias.
        target: ``[B, S]`` global class ids of the (gathered) tokens, ``ignore_index`` where none.
        group: the tensor-parallel group (``mesh.tp_group``); ``None`` is a single rank.
        chunk: tokens per chunk: only ``[chunk, V/t]`` float32 logits exist at any time (forward and
            backward).
        sequence_parallel: ``hidden`` is a sequence shard (see above).

    Returns ``[B, S]`` losses (at least float32), equal to :func:`vocab_parallel_cross_entropy` of the
    LM head's logits (same arithmetic per token); gradients flow to ``hidden`` and ``weight``.
    Backward recomputes each chunk's logits (one more LM-head matmul).  Communication: see
    ``_LinearCrossEntropy`` (per chunk, two all-reduces of ``[chunk]`` floats over tp).
    """
    check(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0, ConfigError,
          f"chunk={chunk!r}: give the tokens per chunk as a positive int")
    check(hidden.dim() == 3 and hidden.is_floating_point(), ShapeError,
          f"hidden must be a floating [B, S, h] tensor, got {tuple(hidden.shape)} {hidden.dtype}")
    check(weight.dim() == 2 and weight.shape[1] == hidden.shape[-1], ShapeError,
          f"weight {tuple(weight.shape)} must be [V/t, h] with h = {hidden.shape[-1]} (the hidden size)")
    n = group_size(group) if sequence_parallel else 1
    want = (hidden.shape[0], hidden.shape[1] * n)
    check(tuple(target.shape) == want, ShapeError,
          f"target {tuple(target.shape)} must be [B, S] = {want}: the tokens of hidden"
          + (" gathered over the tp group (sequence_parallel)" if n > 1 else ""))
    check(not target.is_floating_point(), ShapeError, f"target must hold integer class ids, got {target.dtype}")
    vocab = weight.shape[0] * group_size(group)
    if target.device.type == "cpu":  # on accelerators this would synchronise with the host: unchecked
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        check(not bool(bad.any()), ShapeError,
              f"target ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    return _LinearCrossEntropy.apply(hidden, weight, target, ignore_index, chunk, group, sequence_parallel)


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
