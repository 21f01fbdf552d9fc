"""Run seqpar's CUDA dispatch on CPU: the device check says "cuda", and the CUDA varlen kernels are emulated.

``with cuda_dispatch() as calls:`` makes :func:`seqpar.kernels.device_type` answer ``"cuda"`` for every
tensor (so :func:`~seqpar.kernels.pick_backend` and the masked-block path choose what they would on an
H100/H200) and replaces ``kernels.CUDA_OPS`` by float64 emulations of flash-attn's variable-length
forward and backward with its documented semantics (bottom-right-aligned causal mask and window,
``lse [H, T]`` float32, +inf for a row that sees no key, native GQA, outputs in the input dtype).
Every call's arguments are appended to ``calls``, so a test can assert which op a block gets, and its
result checks the whole path (gathers, cumulative lengths, merges, backward) numerically.
"""
from __future__ import annotations

import contextlib

import torch

from seqpar.core import kernels


def _masks(cu_q, cu_k, causal: bool, window: dict) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """(q0, q1, k0, k1, visible [lq, lk]) per sequence, as flash-attn defines them."""
    left = window.get("window_size_left", -1)
    right = 0 if causal else window.get("window_size_right", -1)
    out = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        lq, lk = q1 - q0, k1 - k0
        i = torch.arange(lq).unsqueeze(1) + (lk - lq)  # bottom-right aligned diagonal
        j = torch.arange(lk).unsqueeze(0)
        vis = torch.ones(lq, lk, dtype=torch.bool)
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
        out.append((q0, q1, k0, k1, vis))
    return out


def _scores(q, k, q0, q1, k0, k1, vis, scale):
    h, hkv = q.shape[1], k.shape[1]
    qq = q[q0:q1].double()
    kk = k[k0:k1].double().repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("ihd,jhd->hij", qq, kk) * scale
    return s.masked_fill(~vis, float("-inf")), kk


def flash_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, calls):
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    calls.append({"op": "flash_varlen_forward", "cu_q": cu_q, "cu_k": cu_k, "max_q": max_q, "max_k": max_k,
                  "causal": causal, "window": dict(window), "dtype": q.dtype, "q": tuple(q.shape),
                  "k": tuple(k.shape)})
    assert max_q == max(b - a for a, b in zip(cu_q, cu_q[1:])) and max_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    assert cu_q[-1] == q.shape[0] and cu_k[-1] == k.shape[0] and k.shape == v.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float64)  # flash-attn: +inf if no key
    h = q.shape[1]
    for q0, q1, k0, k1, vis in _masks(cu_q, cu_k, causal, window):
        s, _ = _scores(q, k, q0, q1, k0, k1, vis, scale)
        row_lse = torch.logsumexp(s, -1)
        seen = torch.isfinite(row_lse)
        p = torch.exp(s - torch.where(seen, row_lse, torch.zeros_like(row_lse)).unsqueeze(-1))
        vv = v[k0:k1].double().repeat_interleave(h // v.shape[1], dim=1)
        out[q0:q1] = torch.einsum("hij,jhd->ihd", p, vv)
        lse[:, q0:q1] = torch.where(seen, row_lse, torch.full_like(row_lse, float("inf")))
    return out.to(q.dtype), lse.float()


def flash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window, calls):
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    calls.append({"op": "flash_varlen_backward", "cu_q": cu_q, "cu_k": cu_k, "causal": causal,
                  "window": dict(window), "lse": (tuple(lse.shape), lse.dtype)})
    h, hkv = q.shape[1], k.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk = torch.zeros((k.shape[0], h, k.shape[2]), dtype=torch.float64)
    dv = torch.zeros_like(dk)
    delta = (dout.double() * out.double()).sum(-1).transpose(0, 1)  # [H, T]
    for q0, q1, k0, k1, vis in _masks(cu_q, cu_k, causal, window):
        s, kk = _scores(q, k, q0, q1, k0, k1, vis, scale)
        p = torch.exp(s - lse[:, q0:q1].double().unsqueeze(-1))
        do = dout[q0:q1].double()
        vv = v[k0:k1].double().repeat_interleave(h // hkv, dim=1)
        dv[k0:k1] += torch.einsum("hij,ihd->jhd", p, do)
        ds = p * (torch.einsum("ihd,jhd->hij", do, vv) - delta[:, q0:q1].unsqueeze(-1)) * scale
        dq[q0:q1] += torch.einsum("hij,jhd->ihd", ds, kk)
        dk[k0:k1] += torch.einsum("hij,ihd->jhd", ds, q[q0:q1].double())
    fold = (lambda g: g.view(g.shape[0], hkv, h // hkv, g.shape[2]).sum(2))
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@contextlib.contextmanager
def cuda_dispatch(capability=(9, 0)):
    """Make kernels choose as on a CUDA device of ``capability``, with the varlen kernels emulated; yields
    the list of recorded calls."""
    calls: list[dict] = []
    saved = (kernels.device_type, kernels._cuda_cap, kernels._cudnn_available, dict(kernels.CUDA_OPS))
    kernels.device_type = lambda t: "cuda"
    kernels._cuda_cap = lambda q: capability
    kernels._cudnn_available = lambda: True
    kernels.CUDA_OPS["flash_varlen_forward"] = lambda *a: flash_varlen_forward(*a, calls)
    kernels.CUDA_OPS["flash_varlen_backward"] = lambda *a: flash_varlen_backward(*a, calls)
    try:
        yield calls
    finally:
        kernels.device_type, kernels._cuda_cap, kernels._cudnn_available = saved[:3]
        kernels.CUDA_OPS.clear()
        kernels.CUDA_OPS.update(saved[3])
