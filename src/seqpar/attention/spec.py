"""One validated description of an attention call (:class:`AttentionSpec`), built before any communication.

:func:`make_spec` checks every argument of :func:`seqpar.attention` and resolves the
defaults once (the group, the layout, the packing, the scale, the kernel), so a bad call
fails with the same error on every rank before any collective, and the strategies see
only explicit values: a process group or :data:`~seqpar.mesh.SINGLE`, a layout object,
a :class:`~seqpar.packing.SeqInfo` or None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError, ShapeError
from ..core.kernels import check_qkv, pick_backend, varlen_supported
from ..core.layout import Layout, check_sharding, plain_seq_info, resolve_layout, resolve_seq_info, sharding_of
from ..core.mesh import Mesh, group_rank, group_size, resolve_group
from ..core.packing import SeqInfo

__all__ = ["AttentionSpec", "make_spec", "check_window"]


@dataclass(eq=False, slots=True)
class AttentionSpec:
    """Everything a strategy needs besides the tensors: resolved, validated, hashable where it matters.

    ``group``: the sequence-parallel group (a process group, or SINGLE); ``n``, ``rank`` its size and
    this rank; ``layout``: the layout object on that group (nested on a 2-D mesh); ``local``: tokens
    per rank; ``info``: packing/padding (None: one unpadded sequence); ``heads``, ``kv_heads``;
    ``fused``: masked blocks may run the variable-length kernels (CUDA, half precision).
    """

    strategy: str
    group: object
    mesh: Mesh | None
    n: int
    rank: int
    layout: Layout
    local: int
    causal: bool
    window: tuple[int, int] | None
    info: SeqInfo | None
    scale: float
    backend: str
    fused: bool
    ring_transport: str
    heads: int
    kv_heads: int
    return_lse: bool
    name: str
    #: q is multiplied by this before the kernels (a scale <= 0: the kernels then get scale 1)
    q_factor: float = 1.0

    @property
    def masked(self) -> bool:
        """Per-token metadata decides the mask (packing, padding or a window), not just the layout."""
        return self.info is not None or self.window is not None

    @property
    def what(self) -> str:
        """How errors name this call, e.g. ``attention layers.3.attn (ring)``."""
        return f"attention {self.name} ({self.strategy})" if self.name else f"attention ({self.strategy})"

    def packing_key(self) -> tuple | None:
        """The packing as plain values (plans are cached on it)."""
        i = self.info
        return None if i is None else (i.cu_seqlens, i.padded_cu_seqlens)


def check_window(window) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` ints >= -1 (-1 unbounded), or None; a ShapeError otherwise."""
    if window is None:
        return None
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ShapeError(f"window={window!r} must be (left, right) with ints >= -1 (-1 = unbounded), e.g. (4095, 0)")
    return int(window[0]), int(window[1])


def _group_and_mesh(strategy: str, mesh: Mesh | None, group, get_mesh) -> tuple[object, Mesh | None]:
    if strategy == "usp":
        mesh = mesh if mesh is not None else get_mesh()
        if mesh is None or group is not None:
            raise ConfigError("strategy='usp' needs a 2-D mesh: seqpar.init(sp=N, ulysses=u), or pass mesh=; "
                              "not group=")
    return resolve_group(group, mesh, "sp"), mesh


def _check_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ShapeError(f"q has {q.shape[1]} local tokens but k/v have {k.shape[1]}: "
                         f"sequence-parallel shards must align")
    if q.shape[1] == 0:
        raise ShapeError("empty sequence shard: every rank needs at least one token")


def _packing(lay: Layout, n: int, local: int, cu_seqlens, seq_info) -> SeqInfo | None:
    """The call's packing (None: one plain sequence of ``local * n`` tokens), checked against the shard length."""
    if cu_seqlens is not None and seq_info is not None:
        raise ShapeError("give cu_seqlens or seq_info, not both")
    if cu_seqlens is None and seq_info is None:
        if n > 1 and local % lay.granule:
            raise ShapeError(f"local length {local} is odd but layout {lay.name!r} holds two chunks per rank: "
                             f"use a global length divisible by {lay.granule * n}, pad with "
                             f"seqpar.shard(..., return_info=True), or use layout='contiguous'")
        return None
    info = resolve_seq_info(lay, n, None, cu_seqlens, seq_info)
    if local != info.local_len:
        raise ShapeError(f"local length {local} does not match the {info.local_len} tokens per rank of {info}: "
                         f"shard the inputs with seqpar.shard(..., cu_seqlens=...)")
    return info if info.packed else None


def _check_sharded_as(spec: AttentionSpec, q, k, v) -> None:
    """q, k, v that came out of seqpar.shard must have been split as this call expects (always checked)."""
    if all(sharding_of(t) is None for t in (q, k, v)):
        return
    expected = spec.info if spec.info is not None else plain_seq_info(spec.layout, spec.n, spec.local)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_sharding(t, expected, name, spec.what)


def make_spec(q, k, v, strategies, get_mesh, causal: bool, strategy: str, mesh: Mesh | None, group, layout,
              cu_seqlens, seq_info, scale, window, backend: str, ring_transport: str, return_lse: bool,
              name: str | None) -> AttentionSpec:
    """Validate a :func:`seqpar.attention` call and resolve its defaults.  No communication."""
    if strategy not in strategies:
        raise ConfigError(f"unknown strategy {strategy!r}: choose one of {tuple(strategies)}")
    if ring_transport not in ("auto", "p2p", "alltoall"):
        raise ConfigError(f"unknown ring_transport {ring_transport!r}: use 'auto', 'p2p' or 'alltoall'")
    _check_shards(q, k, v)
    window = check_window(window)
    group, mesh = _group_and_mesh(strategy, mesh, group, get_mesh)
    n = group_size(group)
    lay = resolve_layout(layout, group, mesh)
    local = q.shape[1]
    info = _packing(lay, n, local, cu_seqlens, seq_info)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ConfigError(f"scale={scale!r} must be a finite number (default 1/sqrt(head_dim))")
    # the CPU flash op gives NaN under a causal mask for scale <= 0; q * scale with scale 1 is the same softmax
    q_factor, scale = (scale, 1.0) if scale <= 0 else (1.0, scale)
    backend = pick_backend(q, backend)
    spec = AttentionSpec(strategy, group, mesh, n, group_rank(group), lay, local, bool(causal), window, info, scale,
                         backend, varlen_supported(q, backend), ring_transport, q.shape[2], k.shape[2],
                         bool(return_lse), name or "", q_factor)
    if not torch.compiler.is_compiling():
        _check_sharded_as(spec, q, k, v)
    return spec
