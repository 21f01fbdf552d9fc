"""Running one planned block: this rank's queries against one rank's keys, merged into float32 accumulators.

Shared by the ring and the all-gather strategies (and ulysses' local attention over
packed or windowed sequences).  A :class:`~seqpar.attention.plans.Block` holds either
kernel tasks (slices with a causal offset, or bias tiles) or variable-length calls;
both run here, forward (:func:`forward_block`) and backward (:func:`backward_block`,
given the merged out and lse).  No communication, no host reads.
"""
from __future__ import annotations

import torch

from ..core.kernels import pair_backward, pair_forward, varlen_backward, varlen_forward
from ..core.merge import accumulation_dtype, merge_into
from .plans import Block, DeviceVarlen

__all__ = ["forward_block", "backward_block", "empty_accumulators"]


def empty_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (float64) out ``[B, L, H, D]`` zeros and lse ``[B, H, L]`` -inf: no key seen yet."""
    b, l, h, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    return (torch.zeros(q.shape, dtype=acc, device=q.device),
            torch.full((b, h, l), float("-inf"), dtype=acc, device=q.device))


def _take(x: torch.Tensor, index, dim: int = 1) -> torch.Tensor:
    return x[(slice(None),) * dim + (index,)] if isinstance(index, slice) else x.index_select(dim, index)


def _merge_rows(acc_out, acc_lse, index, out, lse) -> None:
    """Merge (out, lse) of the rows ``index`` into the accumulators (in place)."""
    if isinstance(index, slice):
        merge_into(acc_out[:, index], acc_lse[:, :, index], out, lse)
        return
    sub_out, sub_lse = acc_out.index_select(1, index), acc_lse.index_select(2, index)
    merge_into(sub_out, sub_lse, out, lse)
    acc_out.index_copy_(1, index, sub_out)
    acc_lse.index_copy_(2, index, sub_lse)


def _add_rows(acc: torch.Tensor, index, grad: torch.Tensor) -> None:
    if isinstance(index, slice):
        acc[:, index] += grad
    else:  # key rows may repeat across sequences: index_add_ sums them
        acc.index_add_(1, index, grad.to(acc.dtype))


def _varlen_forward(q, k, v, call: DeviceVarlen, acc_out, acc_lse, scale) -> None:
    b, h, d, hkv = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    cu_q, cu_k = call.cu(b)
    out, lse = varlen_forward(_take(q, call.q_index).reshape(b * call.rows_q, h, d),
                              _take(k, call.k_index).reshape(b * call.rows_k, hkv, d),
                              _take(v, call.k_index).reshape(b * call.rows_k, hkv, d),
                              cu_q, cu_k, call.max_q, call.max_k, scale=scale, window=call.window)
    _merge_rows(acc_out, acc_lse, call.q_index, out.view(b, call.rows_q, h, d),
                lse.view(h, b, call.rows_q).transpose(0, 1))


def _varlen_backward(dout, q, k, v, out, lse, call: DeviceVarlen, dq, dk, dv, scale) -> None:
    b, h, d, hkv = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    cu_q, cu_k = call.cu(b)
    tq, tk = b * call.rows_q, b * call.rows_k
    rows_lse = _take(lse, call.q_index, dim=2).transpose(0, 1).reshape(h, tq).to(torch.float32).contiguous()
    gq, gk, gv = varlen_backward(_take(dout, call.q_index).reshape(tq, h, d), _take(q, call.q_index).reshape(tq, h, d),
                                 _take(k, call.k_index).reshape(tk, hkv, d), _take(v, call.k_index).reshape(tk, hkv, d),
                                 _take(out, call.q_index).reshape(tq, h, d), rows_lse, cu_q, cu_k, call.max_q,
                                 call.max_k, scale=scale, window=call.window)
    _add_rows(dq, call.q_index, gq.view(b, call.rows_q, h, d))
    _add_rows(dk, call.k_index, gk.view(b, call.rows_k, hkv, d))
    _add_rows(dv, call.k_index, gv.view(b, call.rows_k, hkv, d))


def forward_block(q, k, v, block: Block, acc_out, acc_lse, *, scale: float, backend: str) -> None:
    """Attend q ``[B, Lq, H, D]`` to one key block k, v ``[B, Lk, Hkv, D]`` as planned; merge into the accumulators."""
    if block.calls is not None:
        for call in block.calls:
            _varlen_forward(q, k, v, call, acc_out, acc_lse, scale)
        return
    for t in block.tasks:
        o, lse = pair_forward(q[:, t.q], k[:, t.k], v[:, t.k], causal=t.causal, causal_offset=t.offset,
                              scale=scale, backend=backend, bias=t.bias, dead=t.dead)
        merge_into(acc_out[:, t.q], acc_lse[:, :, t.q], o, lse)


def backward_block(dout, q, k, v, out, lse, block: Block, dq, dk, dv, *, scale: float, backend: str) -> None:
    """Add one key block's gradients (given the merged out and lse) into the float32 accumulators dq, dk, dv."""
    if block.calls is not None:
        for call in block.calls:
            _varlen_backward(dout, q, k, v, out, lse, call, dq, dk, dv, scale)
        return
    for t in block.tasks:
        pair_backward(dout[:, t.q], q[:, t.q], k[:, t.k], v[:, t.k], out[:, t.q], lse[:, :, t.q],
                      causal=t.causal, causal_offset=t.offset, scale=scale, backend=backend,
                      grads=(dq[:, t.q], dk[:, t.k], dv[:, t.k]), bias=t.bias)
