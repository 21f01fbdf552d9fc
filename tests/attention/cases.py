"""Worker functions for the attention tests."""
from __future__ import annotations

import torch

import seqpar
from seqpar.core.layout import get_layout
from tests.helpers import DTYPES, mesh, qkv


def run_attention(strategy: str, layout: str, causal: bool, dtype: str, shape, seed: int = 0,
                  transport: str = "auto", stats: bool = False, backward: bool = True):
    """Run seqpar.attention on this rank's shards of a seeded problem; return shards (and stats)."""
    m = mesh()
    group = m.sp_group
    n, r = m.sp, m.rank("sp")
    q, k, v, do = qkv(shape, seed)
    idx = get_layout(layout).indices(shape[1], n, r)
    ql, kl, vl = (t[:, idx].to(DTYPES[dtype]).requires_grad_() for t in (q, k, v))
    with seqpar.stats.track() as st:
        out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, layout=layout, group=group,
                               ring_transport=transport)
        fwd_calls, fwd_bytes, fwd_pairs = dict(st.calls), dict(st.bytes), st.pairs
        if backward:
            out.backward(do[:, idx].to(DTYPES[dtype]))
    res = {"idx": idx, "out": out.detach()}
    if backward:
        res.update(dq=ql.grad, dk=kl.grad, dv=vl.grad)
    if stats:
        res["stats"] = {"fwd_calls": fwd_calls, "fwd_bytes": fwd_bytes, "pairs": fwd_pairs,
                        "calls": dict(st.calls), "bytes": dict(st.bytes)}
    return res


def assemble(results, key: str, seq_len: int):
    """Put every rank's shard of ``key`` back at its global positions (dim 1)."""
    first = results[0][key]
    full = first.new_empty((first.shape[0], seq_len) + tuple(first.shape[2:]))
    for res in results:
        full[:, res["idx"]] = res[key]
    return full


def run_invalid(call: str):
    """Make a bad call named ``call`` on every rank; the error must come before any collective."""
    mesh()
    q = torch.randn(1, 8, 4, 16)
    k = torch.randn(1, 8, 2, 16)
    with seqpar.stats.track() as st:
        try:
            if call == "strategy":
                seqpar.attention(q, k, k, strategy="nope")
            elif call == "layout":
                seqpar.attention(q, k, k, layout="spiral")
            elif call == "window":
                seqpar.attention(q, k, k, window=(4, "x"))
            elif call == "usp_group":
                seqpar.attention(q, k, k, strategy="usp", group=seqpar.get_mesh().sp_group)
            elif call == "cu_seqlens":
                seqpar.attention(q, k, k, cu_seqlens=[0, 5, 40])
            elif call == "cu_order":
                seqpar.attention(q, k, k, cu_seqlens=[0, 20, 10])
            elif call == "gqa":
                seqpar.attention(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
            elif call == "dims":
                seqpar.attention(q[0], k[0], k[0])
            elif call == "mismatch":
                seqpar.attention(q, k, torch.randn(1, 6, 2, 16))
            elif call == "odd":
                seqpar.attention(q[:, :7], k[:, :7], k[:, :7], layout="zigzag")
            elif call == "dtype":
                seqpar.attention(q, k.double(), k.double())
        except seqpar.SeqParError as e:
            return {"type": type(e).__name__, "msg": str(e), "comm": dict(st.calls)}
    return {"type": None, "msg": "", "comm": dict(st.calls)}


def run_sharded(strategy: str, layout: str, causal: bool, shape, *, cu_seqlens=None, window=None, degrees=None,
                seed: int = 0, dtype: str = "float32", pad: bool = False):
    """Full inputs -> seqpar.shard -> attention -> seqpar.unshard; full output and input gradients.

    ``shard``'s backward gathers, so every rank ends with the whole gradient.
    """
    m = mesh(**(degrees or {}))
    q, k, v, do = (t.to(DTYPES[dtype]) for t in qkv(shape, seed))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    info = None
    with seqpar.stats.track() as st:
        if pad:
            (ql, info), kl, vl = (seqpar.shard(q, 1, layout=layout, return_info=True),
                                  *(seqpar.shard(t, 1, layout=layout, return_info=True)[0] for t in (k, v)))
        else:
            ql, kl, vl = (seqpar.shard(t, 1, layout=layout, cu_seqlens=cu_seqlens) for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, layout=layout, mesh=m,
                               cu_seqlens=cu_seqlens, seq_info=info, window=window)
        pairs = st.pairs
    full = seqpar.unshard(out, 1, layout=layout, cu_seqlens=cu_seqlens, seq_info=info)
    full.backward(do / m.sp)  # unshard's backward sums the ranks' (identical) gradients
    return {"out": full.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "pairs": pairs,
            "padding": None if info is None else info.doc_padding, "local": ql.shape[1]}
