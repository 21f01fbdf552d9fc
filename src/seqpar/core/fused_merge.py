"""One fused GPU kernel (Triton) for the log-sum-exp merge that ring attention runs after every block.

Why: the merge is memory-bound and runs once per ring step on the whole ``[B, L, H, D]``
float32 accumulator.  In PyTorch it is a cast of the block's output to float32 and a
``lerp_`` (plus small ``[B, H, L]`` ops): about 18 bytes moved per element.  This kernel
reads the accumulator and the block's output in its own dtype once and writes the
accumulator once (10 bytes per element for a bf16 output), and does the lse update in the
same launch.  At 32k tokens over 8 ranks a ring step's attention takes a few hundred
microseconds, so the merge is a visible share of it.

Used by :func:`seqpar.kernels.merge_into` for CUDA float32 accumulators when Triton is
installed; ``SEQPAR_FUSED_MERGE=0`` turns it off.  If the kernel fails to compile, the
PyTorch path takes over for the rest of the process (with a warning).  Semantics are those
of ``merge_into``: rows whose lse is -inf on both sides keep the accumulator, NaN propagates.
With ``TRITON_INTERPRET=1`` it also runs on CPU tensors (how it is tested without a GPU).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

__all__ = ["merge_into", "available"]

_STATE: dict = {"kernel": None, "failed": False}


def available() -> bool:
    """Triton importable and the fused merge not switched off (``SEQPAR_FUSED_MERGE=0``) or broken."""
    if _STATE["failed"] or os.environ.get("SEQPAR_FUSED_MERGE", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _build():
    """The kernel, defined on first use (Triton reads TRITON_INTERPRET when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(acc_ptr, acc_lse_ptr, out_ptr, lse_ptr, n_rows, L, H, D,
                     sa_b, sa_l, sa_h, sa_d, so_b, so_l, so_h, so_d, sal_b, sal_h, sal_l, sl_b, sl_h, sl_l,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # int64 offsets: an accumulator can hold more than 2^31 elements (e.g. 128k tokens x 128 heads x 128)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # flattened (b, l, h)
        live = rows < n_rows
        h = rows % H
        l = (rows // H) % L
        b = rows // (H * L)
        acc_lse_at = acc_lse_ptr + b * sal_b + h * sal_h + l * sal_l
        a = tl.load(acc_lse_at, mask=live, other=float("-inf"))
        n = tl.load(lse_ptr + b * sl_b + h * sl_h + l * sl_l, mask=live, other=float("-inf")).to(a.dtype)
        top = tl.maximum(a, n)  # maxnum: a NaN side loses here, and comes back through gap below
        none = (a == float("-inf")) & (n == float("-inf"))  # no key on either side
        gap = tl.where(none, 0.0, -tl.abs(a - n))
        new = tl.where(none, float("-inf"), top + tl.log(1.0 + tl.exp(gap)))  # logaddexp(a, n)
        w = tl.exp(n - tl.where(none, 0.0, new))  # the new part's weight; the accumulator's is 1 - w
        d = tl.arange(0, BLOCK_D)
        both = live[:, None] & (d < D)[None, :]
        acc_at = acc_ptr + (b * sa_b + l * sa_l + h * sa_h)[:, None] + d[None, :] * sa_d
        acc = tl.load(acc_at, mask=both, other=0.0)
        o = tl.load(out_ptr + (b * so_b + l * so_l + h * so_h)[:, None] + d[None, :] * so_d, mask=both,
                    other=0.0).to(acc.dtype)
        tl.store(acc_at, acc + w[:, None] * (o - acc), mask=both)
        tl.store(acc_lse_at, new, mask=live)

    return merge_kernel


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Fused in-place merge of (out ``[B, L, H, D]``, lse ``[B, H, L]``) into float32 accumulators.

    Returns False, having done nothing, where it does not apply (no Triton, not CUDA, not
    float32 accumulators, head dim over 256, or switched off); the caller then merges in PyTorch.
    No communication.
    """
    if not ((acc_out.is_cuda or _interpreting()) and available()):  # the CPU path pays one attribute read
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in (acc_out, acc_lse, out, lse)):
        return False  # the kernel writes in place outside autograd; lerp_ keeps a differentiable merge
    if not (acc_out.dtype == acc_lse.dtype == lse.dtype == torch.float32 and out.dim() == 4
            and out.shape == acc_out.shape and acc_lse.shape == lse.shape == (out.shape[0], out.shape[2], out.shape[1])
            and out.shape[3] <= 256 and out.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    b, l_, h, d = out.shape
    n_rows = b * l_ * h
    if n_rows == 0:
        return True
    import triton

    block_d = triton.next_power_of_2(d)
    rows = max(1, 2048 // block_d)
    try:
        if _STATE["kernel"] is None:
            _STATE["kernel"] = _build()
        # Triton launches on the current CUDA device and stream: make them the tensors'
        with torch.cuda.device(acc_out.device) if acc_out.is_cuda else contextlib.nullcontext():
            _STATE["kernel"][(triton.cdiv(n_rows, rows),)](
                acc_out, acc_lse, out, lse, n_rows, l_, h, d, *acc_out.stride(), *out.stride(),
                *acc_lse.stride(), *lse.stride(), ROWS=rows, BLOCK_D=block_d)
    except Exception as e:  # a compile failure writes nothing: the PyTorch path takes over for good
        _STATE["failed"] = True
        warnings.warn(f"seqpar: the fused Triton merge failed ({type(e).__name__}: {e}); merging in PyTorch",
                      stacklevel=2)
        return False
    return True
