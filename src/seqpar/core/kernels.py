"""Local attention that returns its log-sum-exp: the only place that calls attention kernels.

Every sequence-parallel strategy reduces to "attend a block of queries to a block
of keys, keep (out, lse), merge the partial results" (:mod:`seqpar.core.merge`).
Everything above this module works on (out, lse).

Layout: q ``[B, Lq, H, D]``, k and v ``[B, Lk, Hkv, D]`` (BSHD, ``H % Hkv == 0``
for GQA/MQA), out ``[B, Lq, H, D]``, lse ``[B, H, Lq]`` in float32 (float64 for
float64 inputs).

Causal masks at an offset
-------------------------
Ring attention attends a query block to key blocks that sit elsewhere in the
global sequence.  The convention, defined once here: with ``causal=True`` and
``causal_offset=d``, local query ``i`` may see local key ``j`` iff ``j <= i + d``.
For blocks cut from contiguous global ranges starting at ``q_start`` and
``k_start`` that is ``d = q_start - k_start``; ``d = 0`` is the usual
(top-left aligned) causal mask, ``d >= Lk - 1`` sees everything and
``d <= -Lq`` sees nothing.  Dense fused kernels only know ``d = 0``, so any other
offset is cut into :class:`Task` s that are each either unmasked or plain causal
(:func:`mask_pieces`); no mask tensor is ever built.

Masked blocks (packed documents, padding, windows)
--------------------------------------------------
On CPU they run the flash op with an additive bias over one tile of query rows
(its backward works there).  On CUDA a block's mask becomes one call of the flash
op's variable-length form per window shape (:func:`varlen_forward`: cumulative
lengths, ``window_size_left/right``, native GQA, and a backward that takes the
merged out and lse, which a ring needs); the dense math kernel is the last resort
(float32 inputs on CUDA) and :mod:`seqpar.stats` counts every call of it.

Traps of PyTorch's CPU flash op that are handled here: a zero-length input
kills the process (we never call it with one), q heads not divisible by kv
heads silently gives NaN (we raise), a fully masked row gives lse 0 instead of
-inf (the plan knows those rows and they get -inf), causal is top-left aligned
when lengths differ (CUDA's raw flash op aligns it bottom-right: causal pieces
are always square, where both agree), a scale <= 0 gives NaN under a causal mask
(q is scaled instead).  Nothing here reads tensor data back to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, ShapeError
from .merge import accumulation_dtype, merge, merge_into
from .stats import record_kernel, record_work, tracking
from .varlen import CUDA_OPS, varlen_backward, varlen_forward

__all__ = [
    "Task", "mask_pieces", "offset_pairs", "accumulation_dtype", "attention_with_lse", "pair_forward",
    "pair_backward", "block_forward", "block_backward", "varlen_forward", "varlen_backward", "varlen_supported",
    "merge", "merge_into", "pick_backend", "reference_attention", "check_qkv", "expand_kv", "fold_kv_grad",
    "BACKENDS", "CUDA_OPS", "device_type",
]

BACKENDS = ("auto", "cpu_flash", "cudnn", "flash", "efficient", "math")
_CUDA_ONLY = ("cudnn", "flash", "efficient")


@dataclass(frozen=True)
class Task:
    """Local query rows ``q`` attend local key rows ``k``: one slice pair of attention work.

    Mask: ``bias`` (additive float ``[rows, keys]``, -inf = hidden) if given, else the causal-offset
    mask of this module (``causal``, ``offset``; ``offset=0`` is the plain top-left causal mask).
    ``dead``: the rows (bool ``[rows]``) a bias hides every key from, None when there are none;
    ``visible``: the query-key pairs the bias leaves (both are known when the plan is made, so the
    hot path never reads a mask back).
    """

    q: slice
    k: slice
    causal: bool
    offset: int = 0
    bias: torch.Tensor | None = field(default=None, compare=False)
    dead: torch.Tensor | None = field(default=None, compare=False)
    visible: int | None = field(default=None, compare=False)

    @property
    def pairs(self) -> int:
        """Query-key pairs this task attends."""
        if self.visible is not None:
            return self.visible
        return offset_pairs(self.q.stop - self.q.start, self.k.stop - self.k.start, self.causal, self.offset)


def offset_pairs(lq: int, lk: int, causal: bool, offset: int = 0) -> int:
    """Visible pairs of an ``lq x lk`` block under the causal-offset mask (row i sees keys ``j <= i + offset``)."""
    if not causal:
        return lq * lk
    a = min(max(-offset, 0), lq)  # first row that sees a key
    b = min(max(lk - offset, a), lq)  # first row that sees every key
    return (b - a) * (offset + 1) + (a + b - 1) * (b - a) // 2 + (lq - b) * lk


def mask_pieces(lq: int, lk: int, causal: bool, causal_offset: int = 0) -> list[Task]:
    """Cut the (possibly offset) causal mask of an ``lq x lk`` block into fused-kernel calls.

    Returns an empty list when no query sees any key.  Rows not covered by any
    piece see nothing (their out is 0 and lse is -inf).  Every causal piece is
    square, so it means the same whether a kernel aligns its causal mask top-left
    (SDPA, the CPU and efficient kernels) or bottom-right (the raw CUDA flash op).
    """
    if lq == 0 or lk == 0:
        return []
    if not causal or causal_offset >= lk - 1:
        return [Task(slice(0, lq), slice(0, lk), False)]
    d = causal_offset
    if d + lq - 1 < 0:
        return []
    if d <= 0:
        # rows i < -d see nothing; row i >= -d sees keys 0..i+d: plain causal on q[-d:]
        return _square_causal(-d, lq, 0, lk)
    # 0 < d < lk - 1: keys [0, d) are visible to every row, keys [d, lk) causally
    return [Task(slice(0, lq), slice(0, d), False), *_square_causal(0, lq, d, lk)]


def _square_causal(q0: int, q1: int, k0: int, k1: int) -> list[Task]:
    """Rows ``[q0, q1)`` attend keys ``[k0, k1)`` top-left causally (row ``q0 + i`` sees keys up to ``k0 + i``),
    as square causal pieces plus, when rows outnumber keys, an unmasked piece for the rows that see every key."""
    m, n = q1 - q0, k1 - k0
    if m <= n:  # keys past k0 + m - 1 are seen by no row
        return [Task(slice(q0, q1), slice(k0, k0 + m), True)]
    return [Task(slice(q0, q0 + n), slice(k0, k1), True), Task(slice(q0 + n, q1), slice(k0, k1), False)]


# --------------------------------------------------------------------------- backends


def device_type(t: torch.Tensor) -> str:
    """The device kind kernels are chosen for (one function, so tests can run the CUDA dispatch on CPU)."""
    return t.device.type


def pick_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """Choose the kernel for ``q``'s device, dtype and head dim (``backend`` forces one, checked against the device)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}: choose one of {BACKENDS}")
    dev = device_type(q)
    if backend != "auto":
        if backend in _CUDA_ONLY and dev != "cuda":
            raise ConfigError(f"backend={backend!r} runs on CUDA tensors, but q is on {q.device}: use "
                              f"backend='auto' (picks 'cpu_flash' on CPU) or move the tensors to a GPU")
        if backend == "cpu_flash" and dev != "cpu":
            raise ConfigError(f"backend='cpu_flash' runs on CPU tensors, but q is on {q.device}: use backend='auto'")
        return backend
    if dev == "cpu":
        return "cpu_flash"
    if dev == "cuda":
        d = q.shape[-1]
        half = q.dtype in (torch.float16, torch.bfloat16)
        if half and d in (64, 128) and _cudnn_available() and _cuda_cap(q) >= (9, 0):
            return "cudnn"
        if half and d <= 256 and d % 8 == 0:
            return "flash"
        if q.dtype != torch.float64 and d % 8 == 0:
            return "efficient"
    return "math"


def _cuda_cap(q: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(q.device)


def _cudnn_available() -> bool:
    return torch.backends.cudnn.is_available()


def varlen_supported(q: torch.Tensor, backend: str) -> bool:
    """Masked blocks of ``q`` can run the flash op's variable-length form (CUDA, fp16/bf16, head dim <= 256, /8)."""
    return (backend in _CUDA_ONLY and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat kv heads to ``heads`` (BSHD), for kernels without native GQA.  Local, no communication."""
    rep = heads // k.shape[2]
    return k if rep == 1 else k.repeat_interleave(rep, dim=2)


def fold_kv_grad(dk: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated kv heads back onto the ``kv_heads`` originals (BSHD): the dual of
    :func:`expand_kv`."""
    b, s, h, d = dk.shape
    return dk if h == kv_heads else dk.view(b, s, kv_heads, h // kv_heads, d).sum(3)


def _cpu_float32(*ts):
    """On CPU the float32 flash kernels are faster than bf16/fp16 and round nothing between blocks:
    half-precision pieces are computed in float32 (partial outputs and gradients stay float32
    until the caller's final cast, so ring sums do not accumulate per-block rounding)."""
    return [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in ts]


def _no_key_rows(out, lse, dead):
    """Rows whose bias hides every key: out 0 and lse -inf (the CPU op returns lse 0 there)."""
    if dead is None:
        return out, lse
    return out.masked_fill(dead.view(1, -1, 1, 1), 0.0), lse.masked_fill(dead.view(1, 1, -1), float("-inf"))


def block_forward(q, k, v, *, causal: bool, scale: float, backend: str, bias: torch.Tensor | None = None,
                  dead: torch.Tensor | None = None):
    """One fused kernel call on a piece: returns (out BSHD, lse [B, H, Lq] float32).

    ``out`` is in q's dtype from the CUDA fused kernels, float32 from the math kernel and for half
    inputs on CPU (see :func:`_cpu_float32`): partial results are merged in float32 on every backend.
    ``bias``: optional additive mask ``[Lq, Lk]`` (-inf hides a key), used instead of ``causal``,
    with ``dead`` its rows that see nothing (known from the plan).
    """
    if backend == "cpu_flash":
        q, k, v = _cpu_float32(q, k, v)
    if bias is not None:
        if backend != "cpu_flash":  # the dense CUDA kernels take no mask: the counted last resort
            backend = "math"
        record_kernel(backend)
        if backend == "math":
            out, lse = _math_forward(q, k, v, False, scale, bias)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q), _bhsd(k), _bhsd(v), 0.0, False, attn_mask=bias.to(q.dtype), scale=scale)
            out = _bhsd(out)
        return _no_key_rows(out, lse, dead)
    record_kernel(backend)
    if backend == "math":
        return _math_forward(q, k, v, causal, scale)
    if backend == "cpu_flash":  # native GQA when divisible (checked by the caller)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale
        )
        return _bhsd(out), lse
    h = q.shape[2]
    qt, kt, vt = _bhsd(q), _bhsd(expand_kv(k, h)), _bhsd(expand_kv(v, h))
    if backend == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
    elif backend == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, False,
                                                                 scale=scale)
    elif backend == "efficient":
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, causal, scale=scale)
    else:
        raise ConfigError(f"unknown attention backend {backend!r}")
    lse = res[1]
    if lse.dim() == 4:  # cuDNN returns [B, H, L, 1]
        lse = lse.squeeze(-1)
    # the efficient kernel pads lse's length to a multiple of 32
    return _bhsd(res[0]), lse[..., : q.shape[1]]


def block_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, backend: str,
                   bias: torch.Tensor | None = None):
    """Gradient of one piece given the *final* out and lse of the rows (BSHD in and out).

    Because softmax normalisation is carried by ``lse``, calling this per key
    block with the global out/lse gives gradients that sum to the full ones.
    Rows that see no key at all (lse -inf) contribute nothing.  Gradients are in the
    inputs' dtype from the CUDA fused kernels, float32 from the math and CPU ones.
    """
    # a row with no visible key anywhere has lse -inf; any finite stand-in gives p = 0 for it
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).contiguous()
    if backend == "cpu_flash":
        dout, q, k, v, out = _cpu_float32(dout, q, k, v, out)
    if bias is not None:
        if backend != "cpu_flash":
            return _math_backward(dout, q, k, v, out, lse, False, scale, bias)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, False, attn_mask=bias.to(q.dtype),
            scale=scale)
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, scale)
    if backend == "cpu_flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, causal, scale=scale
        )
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)
    h, hkv = q.shape[2], k.shape[2]
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = _bhsd(q), _bhsd(expand_kv(k, h)), _bhsd(expand_kv(v, h))
    dot, ot = _bhsd(dout), _bhsd(out)
    # philox seed/offset are unused without dropout; the cumulative lengths must be None (undefined): a
    # defined tensor, even an empty one, selects the kernels' variable-length (nested) paths
    empty = torch.empty(0, device=q.device, dtype=torch.int64)
    if backend == "flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse, None, None, lq, lk, 0.0, causal, empty, empty, scale=scale
        )
    elif backend == "cudnn":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse.unsqueeze(-1), empty, empty, None, None, None, lq, lk, 0.0, causal, scale=scale
        )
    elif backend == "efficient":
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dot, qt, kt, vt, None, ot, lse, empty, empty, 0.0, [True, True, True, False], causal, scale=scale
        )
    else:
        raise ConfigError(f"unknown attention backend {backend!r}")
    return _bhsd(dq), fold_kv_grad(_bhsd(dk), hkv), fold_kv_grad(_bhsd(dv), hkv)


# --------------------------------------------------------------------------- the dense math kernel


def _math_scores(q, k, causal, scale, bias=None):
    """Masked scaled scores [B, H, Lq, Lk] in the accumulation dtype (fallback only)."""
    acc = accumulation_dtype(q.dtype)
    kk = expand_kv(k, q.shape[2])
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), kk.to(acc)) * scale
    if bias is not None:
        s = s + bias.to(device=s.device, dtype=acc)
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _math_forward(q, k, v, causal, scale, bias=None):
    """(out, lse) in the accumulation dtype: a partial result is never rounded to bf16 before its merge."""
    s = _math_scores(q, k, causal, scale, bias)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.einsum("bhij,bjhd->bihd", p, expand_kv(v, q.shape[2]).to(s.dtype)), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    """(dq, dk, dv) in the accumulation dtype, summed into float32 accumulators by the callers."""
    acc = accumulation_dtype(q.dtype)
    h, hkv = q.shape[2], k.shape[2]
    s = _math_scores(q, k, causal, scale, bias)
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    do, vv = dout.to(acc), expand_kv(v, h).to(acc)
    dv = torch.einsum("bhij,bihd->bjhd", p, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vv)
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Lq, 1]
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhij,bjhd->bihd", ds, expand_kv(k, h).to(acc))
    dk = torch.einsum("bhij,bihd->bjhd", ds, q.to(acc))
    return dq, fold_kv_grad(dk, hkv), fold_kv_grad(dv, hkv)


# --------------------------------------------------------------------------- pairs of blocks


def check_qkv(q, k, v) -> None:
    """Raise a ShapeError naming the problem unless q ``[B, Lq, H, D]``, k and v ``[B, Lk, Hkv, D]`` fit together:
    floating point, one dtype and device, ``H % Hkv == 0``, ``D > 0``.  No communication."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        raise ShapeError(f"q, k, v must be tensors, got {type(q).__name__}, {type(k).__name__}, {type(v).__name__}")
    qs, ks, vs = q.shape, k.shape, v.shape  # one attribute read each: this runs on every call
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ShapeError(f"q, k, v must be [batch, seq, heads, head_dim]; got dims {len(qs)}, {len(ks)}, {len(vs)}")
    if ks != vs:
        raise ShapeError(f"k {tuple(ks)} and v {tuple(vs)} must have the same shape")
    if qs[0] != ks[0] or qs[3] != ks[3]:
        raise ShapeError(f"q {tuple(qs)} and k {tuple(ks)} disagree on batch or head_dim")
    dtype = q.dtype
    if dtype != k.dtype or dtype != v.dtype:
        raise ShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not dtype.is_floating_point:
        raise ShapeError(f"q, k, v must be floating point (float32, bfloat16, float16 or float64), got {dtype}: "
                         f"attention of integer values is not defined; cast them, e.g. q.float()")
    device = q.device
    if device != k.device or device != v.device:
        raise ShapeError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if qs[3] == 0:
        raise ShapeError(f"head_dim is 0 (q {tuple(qs)}): every head needs at least one feature")
    if ks[2] == 0 or qs[2] % ks[2]:
        raise ShapeError(f"q heads={qs[2]} not divisible by kv heads={ks[2]} (GQA needs heads % kv_heads == 0)")


def pair_forward(q, k, v, *, causal: bool, causal_offset: int, scale: float, backend: str, bias=None, dead=None):
    """Forward of one (q block, k block) pair under the offset mask (or ``bias``), no autograd.

    Returns (out, lse float32 ``[B, H, Lq]``; rows with no visible key: out 0, lse -inf).  ``out``
    is in q's dtype or, where the kernel ran in float32 (math, half inputs on CPU), float32:
    callers merging partial results keep it, others cast.
    """
    if bias is not None:
        return block_forward(q, k, v, causal=False, scale=scale, backend=backend, bias=bias, dead=dead)
    b, lq, h, _ = q.shape
    pieces = mask_pieces(lq, k.shape[1], causal, causal_offset)
    if len(pieces) == 1 and pieces[0].q == slice(0, lq):
        p = pieces[0]
        return block_forward(q, k[:, p.k], v[:, p.k], causal=p.causal, scale=scale, backend=backend)
    acc_out = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
    acc_lse = torch.full((b, h, lq), float("-inf"), dtype=acc_out.dtype, device=q.device)
    for p in pieces:
        o, lse = block_forward(q[:, p.q], k[:, p.k], v[:, p.k], causal=p.causal, scale=scale, backend=backend)
        merge_into(acc_out[:, p.q], acc_lse[:, :, p.q], o, lse)
    return acc_out, acc_lse


def pair_backward(dout, q, k, v, out, lse, *, causal: bool, causal_offset: int, scale: float,
                  backend: str, grads=None, bias=None):
    """Backward of one block pair given the rows' final out and lse.

    ``grads`` = (dq, dk, dv) accumulators to add into (any float dtype, BSHD);
    when None, fresh float32 zeros are used.  Returns the accumulators.
    """
    if grads is None:
        acc = accumulation_dtype(q.dtype)
        grads = tuple(torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    dq, dk, dv = grads
    if bias is not None:
        gq, gk, gv = block_backward(dout, q, k, v, out, lse, causal=False, scale=scale, backend=backend, bias=bias)
        dq += gq
        dk += gk
        dv += gv
        return grads
    for p in mask_pieces(q.shape[1], k.shape[1], causal, causal_offset):
        gq, gk, gv = block_backward(dout[:, p.q], q[:, p.q], k[:, p.k], v[:, p.k], out[:, p.q], lse[:, :, p.q],
                                    causal=p.causal, scale=scale, backend=backend)
        dq[:, p.q] += gq
        dk[:, p.k] += gk
        dv[:, p.k] += gv
    return grads


class _AttentionWithLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, causal_offset, scale, backend):
        out, lse = pair_forward(q, k, v, causal=causal, causal_offset=causal_offset, scale=scale, backend=backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, causal_offset, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, offset, scale, backend = ctx.args
        dq, dk, dv = pair_backward(dout.contiguous(), q, k, v, out, lse, causal=causal, causal_offset=offset,
                                   scale=scale, backend=backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       scale: float | None = None, causal_offset: int = 0,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[B, Lq, H, D]`` over k, v ``[B, Lk, Hkv, D]`` returning (out, lse).

    out is ``[B, Lq, H, D]`` in q's dtype; lse is ``[B, H, Lq]`` float32 (float64
    for float64 input) and not differentiable.  ``causal_offset`` places the
    causal diagonal (see the module docstring).  ``scale`` defaults to ``1/sqrt(D)``;
    any real scale works (0 gives uniform weights, negative ones favour dissimilar keys).
    Differentiable in q, k, v through the fused backward ops: only q, k, v, out and lse
    are saved, never a score matrix.  No communication.
    """
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = pick_backend(q, backend)
    if not scale > 0:  # the CPU flash op gives NaN under a causal mask for scale <= 0: scale q instead
        q, scale = q * scale, 1.0
    if q.shape[1] == 0 or k.shape[1] == 0:  # the CPU op dies with SIGFPE on empty input
        b, lq, h, d = q.shape
        out = q.new_zeros(b, lq, h, d) + 0 * (q.sum() + k.sum() + v.sum())
        return out, torch.full((b, h, lq), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    if tracking():
        pieces = mask_pieces(q.shape[1], k.shape[1], bool(causal), int(causal_offset))
        record_work(sum(p.pairs for p in pieces), len(pieces))
    return _AttentionWithLse.apply(q, k, v, bool(causal), int(causal_offset), scale, backend)


def reference_attention(q, k, v, *, causal=False, causal_offset=0, scale=None, dtype=torch.float64):
    """Dense reference in ``dtype`` (tests and `seqpar check`): returns (out, lse); O(Lq*Lk) memory."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    h = q.shape[2]
    qq, kk, vv = q.to(dtype), expand_kv(k, h).to(dtype), expand_kv(v, h).to(dtype)
    s = torch.einsum("bihd,bjhd->bhij", qq, kk) * scale
    if causal:
        i = torch.arange(q.shape[1], device=q.device).unsqueeze(1)
        j = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.einsum("bhij,bjhd->bihd", p, vv), lse
