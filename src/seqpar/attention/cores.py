"""The communicating core of a strategy as one differentiable step, eager or inside ``torch.compile``.

A strategy's core (the ring's block loop, the all-gather's, ColossalAI's RingQK/RingAV)
is a pair of plain functions, ``forward(core, q, k, v) -> (out, lse, extra)`` and
``backward(core, dout, q, k, v, out, lse, extra) -> (dq, dk, dv)`` (a :class:`CoreKind`;
``extra`` is a tensor the core keeps for backward beyond q, k, v, out and lse, or None),
with the transfers of the next block started before the current block is computed; a
:class:`Core` binds one to a plan, a group and the kernel options.

* Eager: one autograd Function calls them, so the asynchronous overlap of transfer and
  compute is exactly the hand-written one.
* Under ``torch.compile`` the same functions run as the custom op ``seqpar::core`` (and
  ``seqpar::core_backward``), registered with :mod:`torch.library`: Dynamo and Inductor see
  one opaque op with a fake implementation for shapes, and the core inside keeps its
  overlap (Dynamo refuses ``async_op=True`` collectives in a graph, and would trace the
  ring's Python loop into N copies).  The op's last argument is an integer handle naming
  the prepared core (:func:`with_handle`); the plan and the group never enter the graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..core.merge import accumulation_dtype
from .plans import Plan

__all__ = ["CoreKind", "Core", "run_core", "with_handle"]


def _no_extra(core, q) -> None:
    return None


@dataclass(frozen=True)
class CoreKind:
    """A strategy's communicating core (see the module docstring); ``extra_shape(core, q)``: the shape of
    the extra tensor it keeps for backward (float32), None when it keeps none; ``keeps_out``: backward
    needs the output and its lse (False: they are not kept, and backward gets None for them)."""

    name: str
    forward: Callable
    backward: Callable
    extra_shape: Callable = _no_extra
    keeps_out: bool = True


@dataclass(frozen=True, eq=False)
class Core:
    """One core bound to its plan, group (a process group or SINGLE), this rank in it and the kernel options.

    ``fused``: masked blocks may run variable-length kernels (CUDA, half precision); ``handle``: set
    when the call is traced by ``torch.compile`` (the integer the custom op is given).
    """

    kind: CoreKind
    plan: Plan
    group: object
    rank: int
    scale: float
    backend: str
    ring_transport: str = "auto"
    fused: bool = False
    handle: int | None = field(default=None)


class _Core(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, core: Core):
        out, lse, extra = core.kind.forward(core, q, k, v)
        kept = (out, lse) if core.kind.keeps_out else ()
        ctx.save_for_backward(q, k, v, *kept, *(() if extra is None else (extra,)))
        ctx.core = core
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        core = ctx.core
        q, k, v, *rest = ctx.saved_tensors
        out, lse = (rest.pop(0), rest.pop(0)) if core.kind.keeps_out else (None, None)
        dq, dk, dv = core.kind.backward(core, dout.contiguous(), q, k, v, out, lse, *(rest or [None]))
        return dq, dk, dv, None


# --------------------------------------------------------------------------- the compiled path

_HANDLES: list[Core] = []


def with_handle(core: Core) -> Core:
    """``core`` registered for the custom op: a copy carrying the integer that names it (host side, once per trace)."""
    _HANDLES.append(core)
    return replace(core, handle=len(_HANDLES) - 1)


def _unaliased(outputs, inputs) -> tuple[torch.Tensor, ...]:
    """A custom op's outputs may alias neither its inputs nor each other (dK and dV are halves of one
    buffer): clone the ones that do."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        fresh.append(t)
    return tuple(fresh)


@torch.library.custom_op("seqpar::core", mutates_args=())
def _core_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             handle: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    core = _HANDLES[handle]
    out, lse, extra = core.kind.forward(core, q, k, v)
    out, lse, extra = _unaliased((out, lse, q.new_empty(0, dtype=lse.dtype) if extra is None else extra), (q, k, v))
    return out, lse, extra


@_core_op.register_fake
def _core_fake(q, k, v, handle):
    b, s, h, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    shape = _HANDLES[handle].kind.extra_shape(_HANDLES[handle], q)
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=acc), q.new_empty(shape or (0,), dtype=acc)


@torch.library.custom_op("seqpar::core_backward", mutates_args=())
def _core_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, extra: torch.Tensor,
                      handle: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    core = _HANDLES[handle]
    keep = extra if core.kind.extra_shape(core, q) is not None else None
    dq, dk, dv = _unaliased(core.kind.backward(core, dout.contiguous(), q, k, v, out, lse, keep),
                            (dout, q, k, v, out, lse, extra))
    return dq, dk, dv


@_core_backward_op.register_fake
def _core_backward_fake(dout, q, k, v, out, lse, extra, handle):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, handle = inputs
    out, lse, extra = output
    ctx.save_for_backward(q, k, v, out, lse, extra)
    ctx.handle = handle


def _backward(ctx, dout, _dlse, _dextra):
    q, k, v, out, lse, extra = ctx.saved_tensors
    dq, dk, dv = _core_backward_op(dout, q, k, v, out, lse, extra, ctx.handle)
    return dq, dk, dv, None


_core_op.register_autograd(_backward, setup_context=_setup)


def run_core(core: Core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``core`` on q, k, v, differentiable in q, k, v.

    A core with a handle (prepared under ``torch.compile``) runs as the ``seqpar::core`` custom op.
    """
    if core.handle is not None:
        out, lse, _ = torch.ops.seqpar.core(q, k, v, core.handle)
        return out, lse
    return _Core.apply(q, k, v, core)
