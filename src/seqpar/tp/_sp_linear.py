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

import torch
import torch.nn.functional as F

from ..core.comm import all_gather_tensor, reduce_scatter_tensor


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
        return F.linear(all_gather_tensor(x, dim, group), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(weight.dtype)
        total = all_gather_tensor(x, ctx.dim, ctx.group, async_op=True) if need_w else None
        pending_x = None
        if need_x:  # the input gradient's matmul overlaps the all-gather, its reduce-scatter the weight's matmul
            pending_x = reduce_scatter_tensor(grad_out.matmul(weight), ctx.dim, ctx.group, async_op=True)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_b = grad_x = None
        if total is not None:
            grad_w = g2.t().matmul(total.wait().reshape(-1, x.shape[-1])).to(ctx.dtypes[0])
        if need_b:
            grad_b = g2.sum(0).to(ctx.dtypes[1])
        if pending_x is not None:
            grad_x = pending_x.wait().to(ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None, None
