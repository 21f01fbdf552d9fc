"""Worker-side helpers shared by distributed tests (module-level: tasks pickle by reference)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import seqpar

_MESHES: dict = {}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mesh(**degrees) -> seqpar.Mesh:
    """The mesh for these degrees in this worker, built once (groups are collective and not free)."""
    key = tuple(sorted(degrees.items()))
    if key not in _MESHES:
        _MESHES[key] = seqpar.init(**degrees)
    seqpar.set_mesh(_MESHES[key])
    return _MESHES[key]


def qkv(shape, seed: int, dtype=torch.float64):
    """Full (unsharded) q, k, v and an output gradient, identical on every rank. shape = (B, S, H, Hkv, D)."""
    b, s, h, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, do))


def sdpa_reference(q, k, v, do, causal: bool, dtype=torch.float64):
    """Single-device F.scaled_dot_product_attention (BSHD) in ``dtype``: (out, dq, dk, dv)."""
    q, k, v = (t.detach().to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(do.to(dtype).transpose(1, 2))
    return tuple(t.transpose(1, 2).detach() for t in (out, q.grad, k.grad, v.grad))


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def masked_reference(q, k, v, do, *, causal: bool, cu_seqlens=None, window=None):
    """float64 attention with an explicit dense mask (documents, causal, window): (out, dq, dk, dv)."""
    s = q.shape[1]
    pos = torch.arange(s)
    doc = torch.zeros(s, dtype=torch.long)
    if cu_seqlens is not None:
        for d, (a, b) in enumerate(zip(cu_seqlens, cu_seqlens[1:])):
            doc[a:b] = d
            pos[a:b] = torch.arange(b - a)
    rel = pos.unsqueeze(0) - pos.unsqueeze(1)  # key pos - query pos
    keep = doc.unsqueeze(0) == doc.unsqueeze(1)
    if causal:
        keep &= rel <= 0
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= rel >= -left
        if right >= 0:
            keep &= rel <= right
    q, k, v = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(do.double().transpose(1, 2))
    return tuple(t.transpose(1, 2).detach() for t in (out, q.grad, k.grad, v.grad))


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    """The module of ``examples/<name>.py`` (the examples folder is appended to sys.path: it shadows nothing,
    and ranks import it again with each task)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    return importlib.import_module(name)
