"""ZeRO-3 / ZeRO-2 for the reference model: PyTorch FSDP2 (``fully_shard``) over the mesh's dp x sp group.

Sequence-parallel ranks hold the same weights and average their gradients with data parallelism,
so parameters, gradients and optimizer state are sharded over the ``dp * sp`` ranks of
``mesh.dp_sp_mesh`` (as DeepSpeed-Ulysses does), each tensor-parallel rank sharding its own tp
shards.  Every decoder layer is one FSDP unit (its parameters are all-gathered just before it
runs, forward and backward, and freed after), the embedding, final norm and LM head form the
root unit.  ``zero_stage=3`` frees each layer's gathered parameters after its forward
(``reshard_after_forward=True``), ``zero_stage=2`` keeps them until backward (one all-gather per
step instead of two).  ``offload_optimizer`` keeps the sharded parameters, gradients and optimizer
state in host memory (FSDP2's ``CPUOffloadPolicy``): the optimizer steps on the CPU.

FSDP averages gradients over dp x sp itself (a reduce-scatter per unit), which is what
:func:`seqpar.train.sync_gradients` does without it; :func:`reduce_gradients` and
:func:`clip_gradients` do the rest (the tensor-parallel sum of sequence-parallel norm gradients,
the global norm) for either kind of model.  Checkpoints (:mod:`seqpar.train.checkpoint`) read and
write the sharded model through :meth:`seqpar.models.LlamaForCausalLM.entries`, which gathers
each tensor whole, so a run saved with FSDP resumes at any layout, with or without it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.comm import all_reduce_coalesced, reduce_in_place
from ..core.errors import ConfigError, check
from ..core.mesh import Mesh, resolve_mesh
from .grads import clip_grad_norm, sync_gradients

__all__ = ["ZERO_STAGES", "shard_model", "is_sharded", "reduce_gradients", "clip_gradients"]

#: ZeRO stages the trainer runs: 0 (replicated, :func:`seqpar.train.sync_gradients`), 2 and 3 (FSDP2)
ZERO_STAGES = (0, 2, 3)
_MARKS = ("sequence_parallel", "tensor_parallel")


def check_zero_stage(zero_stage: int, offload_optimizer: bool) -> None:
    """Refuse, by name, what :func:`shard_model` does not run."""
    check(zero_stage in ZERO_STAGES, ConfigError,
          f"zero_stage={zero_stage!r}: seqpar runs 0 (replicated), 2 or 3 (FSDP2 over dp x sp); stage 1 "
          f"(optimizer state only) is not implemented: use 2, which also shards the gradients")
    check(not offload_optimizer or zero_stage >= 2, ConfigError,
          "offload_optimizer=True keeps FSDP2's sharded state in host memory: it needs zero_stage=2 or 3")


def shard_model(model: nn.Module, mesh: Mesh | None = None, *, zero_stage: int = 3,
                offload_optimizer: bool = False) -> nn.Module:
    """Shard ``model`` (a :class:`seqpar.models.LlamaForCausalLM`) with FSDP2 over ``mesh.dp_sp_mesh``, in place.

    Call it after the weights are set and before the optimizer is built (the optimizer must see the
    sharded parameters).  Each layer of ``model.layers`` becomes one unit, the rest the root unit.
    Returns ``model``.  Parameter marks (``sequence_parallel``, ``tensor_parallel``) are carried over to
    the sharded parameters.  Communication: none here; per step, an all-gather of each unit's
    parameters before its forward (stage 3: and again before its backward) and a reduce-scatter of
    its gradients (averaged over dp x sp) after its backward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    check_zero_stage(zero_stage, offload_optimizer)
    mesh = resolve_mesh(mesh)
    check(mesh.dp_sp_mesh is not None, ConfigError,
          "zero_stage 2/3 shards over the process group's dp x sp ranks: launch with torchrun (even "
          "--nproc-per-node 1) or seqpar.init() under a process group")
    marks = {name: {m: getattr(p, m) for m in _MARKS if hasattr(p, m)} for name, p in model.named_parameters()}
    cuda = next(model.parameters()).device.type == "cuda"
    policy = CPUOffloadPolicy(pin_memory=cuda) if offload_optimizer else OffloadPolicy()
    kw = {"mesh": mesh.dp_sp_mesh, "reshard_after_forward": zero_stage == 3, "offload_policy": policy}
    layers: nn.ModuleList = getattr(model, "layers")  # noqa: B009 - typed: Module.__getattr__ is not
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for name, p in model.named_parameters():
        for m, v in marks.get(name, {}).items():
            setattr(p, m, v)
    setattr(model, "_seqpar_zero_stage", zero_stage)  # noqa: B010 - a plain attribute, not a submodule
    return model


def is_sharded(model: nn.Module) -> bool:
    """``model`` went through :func:`shard_model`."""
    return getattr(model, "_seqpar_zero_stage", 0) > 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def reduce_gradients(model: nn.Module, mesh: Mesh | None = None) -> None:
    """After backward, whatever the model: :func:`seqpar.train.sync_gradients`, or its remaining part under FSDP.

    FSDP already averaged every gradient over dp x sp; what is left is the sum over tp of the
    gradients of sequence-parallel norms (each tp rank saw a shard of the tokens), on the local
    shards.  Communication: one coalesced all-reduce over tp (none when tp is 1).
    """
    mesh = resolve_mesh(mesh)
    if not is_sharded(model):
        sync_gradients(model, mesh)
        return
    grads = [_local(p.grad) for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    all_reduce_coalesced(grads, mesh.tp_group)


def clip_gradients(model: nn.Module, max_norm: float, mesh: Mesh | None = None) -> float:
    """:func:`seqpar.train.clip_grad_norm` for either kind of model; returns the global norm before clipping.

    Under FSDP each rank holds a dp x sp shard of its tp shard: squares add over dp x sp and over
    tp, parameters replicated over tp counting once.  Communication: two all-reduces of a float64
    scalar and one host read.
    """
    mesh = resolve_mesh(mesh)
    if not is_sharded(model):
        return clip_grad_norm(model, max_norm, mesh)
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        s = _local(p.grad).detach().double().pow(2).sum().cpu()
        sq += s if getattr(p, "tensor_parallel", False) else s / mesh.tp
    reduce_in_place(sq, mesh.dp_sp_group)
    norm = reduce_in_place(sq, mesh.tp_group).sqrt().item()
    if norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                _local(p.grad).mul_(max_norm / (norm + 1e-6))
    return norm
