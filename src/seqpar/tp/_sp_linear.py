"""Column-parallel linear on sequence shards that stores only the shard (Korthikanti et al. 2022, sec. 4.2.2).

``F.linear(all_gather(x), W)`` through autograd would keep the gathered
``[B, S, h]`` input alive for the weight gradient: t times the shard, which is
exactly the activation memory sequence parallelism exists to remove.  This
Function saves the ``[B, S/t, h]`` shard and all-gathers it again in backward,
overlapped with the input-gradient matmul; the input gradient's reduce-scatter
in turn overlaps the weight-gradient matmul (Megatron's
``LinearWithGradAccumulationAndAsyncCommunication``).

Communication: forward one all-gather; backward one all-gather and one reduce-scatter.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.comm import _all_gather, _all_gather_tensor, _reduce_scatter_tensor
from ..core.mesh import group_size
from ..core.stats import record_comm


def _start_all_gather(x: torch.Tensor, dim: int, group) -> Callable[[], torch.Tensor]:
    """Begin gathering ``x`` along ``dim``; the returned callable waits and returns the result."""
    n, x = group_size(group), x.contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    record_comm("all_gather", x.numel() * x.element_size() * (n - 1))
    work = _all_gather_tensor(out, x, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return out.view((n,) + tuple(x.shape)).movedim(0, dim).flatten(dim, dim + 1)
    return finish


def _start_reduce_scatter(x: torch.Tensor, dim: int, group) -> Callable[[], torch.Tensor]:
    """Begin summing ``x`` over the group keeping this rank's chunk along ``dim``; callable waits."""
    n = group_size(group)
    inp = x.unflatten(dim, (n, -1)).movedim(dim, 0).contiguous()
    out = x.new_empty(inp.shape[1:])
    record_comm("reduce_scatter", inp.numel() * inp.element_size() * (n - 1) // n)
    work = _reduce_scatter_tensor(out, inp.flatten(0, 1), group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return out
    return finish


class GatherLinear(torch.autograd.Function):
    """``F.linear(all_gather(x, dim), weight, bias)`` over ``group`` (size > 1), saving only ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, group):
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, x.dtype)  # grads go back in these
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # do autocast's casts here, so that what is saved is what backward computes with
            dt = torch.get_autocast_dtype(device)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        ctx.dim, ctx.group = dim, group
        ctx.save_for_backward(x, weight)
        return F.linear(_all_gather(x, dim, group), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(weight.dtype)
        wait_total = _start_all_gather(x, ctx.dim, ctx.group) if need_w else None
        grad_total = grad_out.matmul(weight) if need_x else None  # overlaps the all-gather
        wait_grad_x = _start_reduce_scatter(grad_total, ctx.dim, ctx.group) if need_x else None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_b = None
        if need_w:  # overlaps the reduce-scatter
            grad_w = g2.t().matmul(wait_total().reshape(-1, x.shape[-1])).to(ctx.dtypes[0])
        if need_b:
            grad_b = g2.sum(0).to(ctx.dtypes[1])
        grad_x = wait_grad_x().to(ctx.dtypes[2]) if need_x else None
        return grad_x, grad_w, grad_b, None, None
