"""``seqpar.attention``: attention over a sequence sharded across a process group.

Every strategy takes this rank's shards q ``[B, S/N, H, D]`` and k, v
``[B, S/N, Hkv, D]`` in the given sequence layout and returns this rank's
output shard ``[B, S/N, H, D]``, equal to ``scaled_dot_product_attention`` on the
unsharded tensors (forward and gradients) within the dtype's tolerance.

:func:`attention` validates the call into one :class:`~seqpar.attention.spec.AttentionSpec`
and hands it to the strategy registered under its name (:mod:`seqpar.attention.registry`):
the strategy prepares its plan (cached per batch) and runs.  ``torch.compile(fullgraph=True)``
traces it: the host-side preparation runs once per trace, outside the graph, and each
strategy's communicating core is one custom op (:mod:`seqpar.attention.cores`).
"""
from __future__ import annotations

import torch

from ..core.debug import check_agree, check_finite, check_finite_enabled
from ..core.layout import mark_sharding
from ..core.mesh import Mesh, get_mesh
from ..core.stats import record_work, tracking
from ..core.strategies import SP_STRATEGIES
from . import ring, ring_qk_av, ulysses, usp  # noqa: F401  (each registers its strategies)
from .cores import Core, with_handle
from .plans import clear_plans
from .registry import REGISTRY, Strategy, get_strategy, register
from .spec import AttentionSpec, make_spec

__all__ = ["attention", "STRATEGIES", "Strategy", "register", "get_strategy", "REGISTRY", "AttentionSpec",
           "clear_plans"]

STRATEGIES = SP_STRATEGIES


def _prepare(q, k, v, args: tuple) -> tuple[AttentionSpec, Core]:
    """Validate and plan a call (host only, before any communication); ``args``: :func:`make_spec`'s."""
    spec = make_spec(q, k, v, REGISTRY, get_mesh, *args)
    strategy = REGISTRY[spec.strategy]
    strategy.validate(spec, q, k, v)
    return spec, strategy.prepare(spec)


class _Traced:
    """What the traced graph needs from the host-side preparation: the spec and the registered core."""

    def __init__(self, spec: AttentionSpec, core: Core):
        self.spec, self.core = spec, core


@torch.compiler.assume_constant_result
def _prepare_traced(q_meta, k_meta, v_meta, mesh, group, layout, seq_info, options) -> _Traced:
    """:func:`_prepare` for ``torch.compile``: Dynamo calls it once per trace with constants (shapes, dtypes,
    devices, the mesh, group, layout and packing objects) and keeps its result as a constant."""
    q, k, v = (torch.empty((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in
               (q_meta, k_meta, v_meta))
    causal, strategy, cu_seqlens, scale, window, backend, ring_transport, return_lse, name = options
    spec, core = _prepare(q, k, v, (causal, strategy, mesh, group, layout, cu_seqlens, seq_info, scale, window,
                                    backend, ring_transport, return_lse, name))
    return _Traced(spec, with_handle(core))


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


def _check_inputs(spec: AttentionSpec, q, k, v) -> None:
    """Debug mode: every rank makes the same call; check-finite mode: no NaN/Inf in q, k, v."""
    check_agree(spec.what, spec.group, q=q, k=k, v=v, causal=spec.causal, layout=spec.layout.name,
                window=spec.window, scale=spec.scale, docs=None if spec.info is None else spec.info.cu_seqlens)
    if check_finite_enabled():  # the CPU kernel silently turns a NaN query row into zeros: check inputs too
        check_finite({"q": q, "k": k, "v": v}, spec.what, spec.group)


def _check_output(spec: AttentionSpec, out: torch.Tensor) -> None:
    if check_finite_enabled():
        check_finite({"the output": out}, spec.what, spec.group)
        if out.requires_grad:  # every rank runs this hook at the same point of backward
            out.register_hook(lambda g: check_finite({"the output gradient": g}, spec.what, spec.group))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, strategy: str = "ring",
              mesh: Mesh | None = None, group=None, layout: str = "zigzag", cu_seqlens=None, seq_info=None,
              scale: float | None = None, window=None, backend: str = "auto", ring_transport: str = "auto",
              return_lse: bool = False, name: str | None = None):
    """Exact attention of this rank's query shard over the whole (sharded) sequence.

    Args:
        q: ``[B, S/N, H, D]`` this rank's queries, in ``layout`` order.
        k, v: ``[B, S/N, Hkv, D]`` with ``H % Hkv == 0`` (GQA/MQA).
        causal: causal mask over *global* positions.
        strategy: ``ring`` (K/V passed around the ring, overlapped), ``ulysses``
            (all-to-all to a head split), ``allgather`` (gather K/V), ``usp``
            (ulysses inside ``mesh.ulysses_group``, ring across ``mesh.ring_group``)
            or ``ring_qk_av`` (ColossalAI's RingQK/RingAV, memory O(S/N * S)); any
            strategy registered with :func:`register`.
        mesh, group: the sequence-parallel group is ``group`` if given, else
            ``mesh.sp_group``, else the default mesh's (see :func:`seqpar.init`);
            :data:`seqpar.mesh.SINGLE` keeps the call on this process.
            ``usp`` needs a mesh (explicit or default).
        layout: ``zigzag`` (balanced causal work), ``contiguous`` or ``stripe``;
            must match how the inputs were sharded (:func:`seqpar.shard`; a shard
            from it that was split otherwise raises).
        cu_seqlens: packed documents (flash-attn varlen convention, over the
            unpadded global sequence; a list or an integer tensor); tokens never
            attend across documents.
        seq_info: the :class:`~seqpar.packing.SeqInfo` from
            ``seqpar.shard(..., return_info=True)`` (packing and padding); use
            instead of ``cu_seqlens``.
        scale: softmax scale, default ``1/sqrt(D)``; any finite value.
        window: ``(left, right)`` sliding window over positions (-1 unbounded):
            key at p' visible to query at p iff ``p - left <= p' <= p + right``.
        backend: local kernel (``auto``, ``cpu_flash``, ``cudnn``, ``flash``, ``efficient``, ``math``);
            masked blocks on CUDA run the flash op's variable-length form whatever the dense choice.
        ring_transport: ``auto``, ``p2p`` or ``alltoall`` (see :class:`seqpar.comm.RingExchange`).
        return_lse: also return the float32 log-sum-exp ``[B, H, S/N]`` of each query row.
        name: what to call this call in errors (e.g. ``"layers.3.attn"``).

    Returns:
        ``out [B, S/N, H, D]`` in q's dtype (and lse when ``return_lse``).

    Every check on the arguments runs before any communication, so a bad call
    fails with the same error on every rank instead of hanging.  The work plan
    is built once per layout, mask and packing and reused by every later call
    (every layer of a step); nothing is read back from the device.  With
    :func:`seqpar.set_debug` the ranks also check that they all make the same
    call (one small all-gather); with :func:`seqpar.set_check_finite` inputs,
    outputs and gradients are checked for NaN/Inf (both in eager mode only).
    """
    if torch.compiler.is_compiling():
        options = (causal, strategy, cu_seqlens, scale, window, backend, ring_transport, return_lse, name)
        traced = _prepare_traced(_meta(q), _meta(k), _meta(v), mesh, group, layout, seq_info, options)
        spec, core = traced.spec, traced.core
    else:
        spec, core = _prepare(q, k, v, (causal, strategy, mesh, group, layout, cu_seqlens, seq_info, scale, window,
                                        backend, ring_transport, return_lse, name))
        _check_inputs(spec, q, k, v)
        if tracking():
            record_work(*core.plan.work(core.rank, core.fused))
    if spec.q_factor != 1.0:  # scale <= 0: the kernels get q * scale and a scale of 1
        q = q * spec.q_factor
    out, lse = REGISTRY[spec.strategy].run(spec, core, q, k, v)
    if not torch.compiler.is_compiling():
        _check_output(spec, out)
        mark_sharding(out, spec.info, spec.layout, spec.n, spec.local)
    return (out, lse) if return_lse else out
