"""flash-attn's variable-length attention op: how masked blocks run on CUDA.

A block's mask (packed documents, padding, sliding windows) is cut by
:func:`seqpar.core.masks.varlen_calls` into sequences that each see a
bottom-right-aligned band of keys; the sequences of one band shape are one call of
``aten._flash_attention_forward`` with cumulative lengths (``cu_seqlens``) and
``window_size_left/right``.  It takes GQA natively and its backward takes the merged
out and lse, which a ring needs (gradients per key block then sum to the full ones).
The ops are called only through :data:`CUDA_OPS`, so tests can emulate them on CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .stats import record_kernel

__all__ = ["CUDA_OPS", "varlen_forward", "varlen_backward"]


def _flash_varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, window):
    res = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                  scale=scale, **window)
    return res[0], res[1]


def _flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                           window):
    empty = torch.empty(0, device=q.device, dtype=torch.int64)  # philox state: unused without dropout
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                                    empty, empty, scale=scale, **window)


#: the CUDA variable-length kernels, called only through this table: tests replace them with emulations
#: to run (and inspect) the CUDA dispatch on CPU
CUDA_OPS: dict[str, Callable[..., Any]] = {"flash_varlen_forward": _flash_varlen_forward,
                                           "flash_varlen_backward": _flash_varlen_backward}


def _window_args(left: int, right: int) -> tuple[bool, dict]:
    """flash-attn's (is_causal, window_size_*) for a bottom-right-aligned band ``[i + c - left, i + c + right]``
    (-1: unbounded): causal is the band (-1, 0), no mask is (-1, -1)."""
    if left < 0 and right == 0:
        return True, {}
    if left < 0 and right < 0:
        return False, {}
    return False, {"window_size_left": left, "window_size_right": right}


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, scale: float, window: tuple[int, int]):
    """Attention of packed sequences: q ``[T_q, H, D]``, k/v ``[T_k, Hkv, D]`` cut by ``cu_q``/``cu_k`` (int32,
    on the device) into sequences that each see a bottom-right-aligned band ``window=(left, right)`` of keys.

    Returns (out ``[T_q, H, D]`` in q's dtype, lse ``[H, T_q]`` float32).  One flash-attn varlen call
    (CUDA, fp16/bf16, native GQA).  No communication.
    """
    record_kernel("flash_varlen")
    causal, win = _window_args(*window)
    return CUDA_OPS["flash_varlen_forward"](q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, win)


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, *, scale: float,
                    window: tuple[int, int]):
    """Gradients (dq, dk, dv) of :func:`varlen_forward` given the rows' *final* out and lse ``[H, T_q]``.

    Like :func:`block_backward`, per key block with the merged out/lse the gradients sum to the full ones.
    """
    causal, win = _window_args(*window)
    return CUDA_OPS["flash_varlen_backward"](dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, win)
