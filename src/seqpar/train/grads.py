"""Gradient reduction after backward: sequence-parallel norms over tp, every gradient over dp x sp, clipping."""
from __future__ import annotations

import torch
from torch import nn

from ..core.comm import agreed_grads, all_reduce_coalesced, reduce_in_place
from ..core.mesh import Mesh, resolve_mesh
from ..tp import sync_sequence_parallel_grads

__all__ = ["sync_gradients", "clip_grad_norm"]


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


def clip_grad_norm(model: nn.Module, max_norm: float, mesh: Mesh | None = None) -> float:
    """Clip by the global gradient norm (after :func:`sync_gradients`); returns the norm before clipping.

    Shards over tp add up; parameters replicated over tp count once.  Communication: one
    all-reduce of a float64 scalar over tp, and one host read of the norm.
    """
    mesh = resolve_mesh(mesh)
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        s = p.grad.detach().double().pow(2).sum().cpu()
        sq += s if getattr(p, "tensor_parallel", False) else s / mesh.tp
    norm = reduce_in_place(sq, mesh.tp_group).sqrt().item()
    if norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm
