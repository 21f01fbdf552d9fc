"""Merging partial attention results by their log-sum-exp, in float32.

Every strategy computes attention block by block and combines the blocks' ``(out, lse)``
here: on every backend the accumulators are float32 (float64 for float64 inputs), so a
block's partial output is never rounded to the input dtype before it is merged.  On CUDA
with Triton the in-place merge is one fused kernel (:mod:`seqpar.core.fused_merge`).
"""
from __future__ import annotations

import torch

from . import fused_merge

__all__ = ["accumulation_dtype", "merge", "merge_into"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every float dtype but float64: where partial results are summed and merged."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets.

    out ``[B, L, H, D]``, lse ``[B, H, L]``.  Computed in float32 (float64 for
    float64): ``lse = logaddexp(lse_a, lse_b)``, ``out = w_a*out_a + w_b*out_b`` with
    ``w_x = exp(lse_x - lse) = sigmoid(lse_x - lse_other)``.  Written with
    logaddexp rather than sigmoid so a side with lse = -inf (no visible key)
    gets weight exactly 0, and both sides -inf give out 0, lse -inf, not NaN.
    Returns (out float32, lse float32).  No communication.
    """
    acc = torch.promote_types(accumulation_dtype(out_a.dtype), accumulation_dtype(out_b.dtype))
    out = out_a.to(acc).clone()
    lse = lse_a.to(acc).clone()
    merge_into(out, lse, out_b, lse_b)
    out.masked_fill_(torch.isneginf(lse).transpose(1, 2).unsqueeze(-1), 0.0)  # no key on either side: out 0
    return out, lse


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In-place :func:`merge` of (out, lse) into float accumulators (views are fine).

    The two weights sum to one, so ``acc = w_acc*acc + w_new*out`` is ``acc.lerp_(out, w_new)``:
    one in-place pass over the ``[B, L, H, D]`` accumulator instead of four (two products, a
    sum, a temporary), which is what the merge costs per ring step: it is memory-bound and
    runs once per block.  Where no key is visible on either side (both lse -inf), w_new is 0
    and the accumulator keeps its value: every producer in this package writes out 0 on rows
    whose lse is -inf (:func:`merge` zeroes them for other callers).  A NaN lse still propagates.
    """
    if fused_merge.merge_into(acc_out, acc_lse, out, lse):  # CUDA with Triton: one kernel, one pass
        return
    lse = lse.to(acc_lse.dtype)
    new_lse = torch.logaddexp(acc_lse, lse)
    finite = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_new = torch.exp(lse - finite).to(acc_out.dtype).transpose(1, 2).unsqueeze(-1)
    acc_out.lerp_(out.to(acc_out.dtype), w_new)
    acc_lse.copy_(new_lse)
