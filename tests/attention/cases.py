"""Worker functions for the attention tests."""
from __future__ import annotations

import torch

import seqpar
from seqpar.core.layout import get_layout
from tests.helpers import DTYPES, mesh, qkv


def run_attention(strategy: str, layout: str, causal: bool, dtype: str, shape, seed: int = 0,
                  transport: str = "auto", stats: bool = False, backward: bool = True, backend: str = "auto"):
    """Run seqpar.attention on this rank's shards of a seeded problem; return shards (and stats)."""
    m = mesh()
    group = m.sp_group
    n, r = m.sp, m.rank("sp")
    q, k, v, do = qkv(shape, seed)
    idx = get_layout(layout).indices(shape[1], n, r)
    ql, kl, vl = (t[:, idx].to(DTYPES[dtype]).requires_grad_() for t in (q, k, v))
    with seqpar.stats.track() as st:
        out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, layout=layout, group=group,
                               ring_transport=transport, backend=backend)
        fwd_calls, fwd_bytes, fwd_pairs, kernels = dict(st.calls), dict(st.bytes), st.pairs, dict(st.kernels)
        if backward:
            out.backward(do[:, idx].to(DTYPES[dtype]))
    res = {"idx": idx, "out": out.detach()}
    if backward:
        res.update(dq=ql.grad, dk=kl.grad, dv=vl.grad)
    if stats:
        res["stats"] = {"fwd_calls": fwd_calls, "fwd_bytes": fwd_bytes, "pairs": fwd_pairs,
                        "calls": dict(st.calls), "bytes": dict(st.bytes), "kernels": kernels}
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
            elif call == "integer":
                seqpar.attention(q.long(), k.long(), k.long())
            elif call == "head_dim":
                seqpar.attention(q[..., :0], k[..., :0], k[..., :0])
            elif call == "float_cu":
                seqpar.attention(q, k, k, cu_seqlens=torch.tensor([0.0, 13.5, 32.0]))
            elif call == "float_cu_list":
                seqpar.attention(q, k, k, cu_seqlens=[0, 13.5, 32])
            elif call == "backend":
                seqpar.attention(q, k, k, backend="flash")
            elif call == "scale":
                seqpar.attention(q, k, k, scale=float("nan"))
            elif call in ("layout_mismatch", "packing_mismatch", "padding_mismatch"):
                _mismatched(call)
        except seqpar.SeqParError as e:
            return {"type": type(e).__name__, "msg": str(e), "comm": dict(st.calls)}
    return {"type": None, "msg": "", "comm": dict(st.calls)}


def _mismatched(call: str):
    """Shards made one way, attended another (every rank computes the same check, before communicating)."""
    full = torch.randn(1, 32, 4, 16)
    if call == "layout_mismatch":  # contiguous shards to a zigzag attention
        q = seqpar.shard(full, 1, layout="contiguous")
        seqpar.attention(q, q, q, causal=True, layout="zigzag")
    elif call == "packing_mismatch":  # sharded as one sequence, attended as packed documents
        q = seqpar.shard(full, 1)
        seqpar.attention(q, q, q, causal=True, cu_seqlens=[0, 16, 32])
    else:  # padded by shard, attended without the SeqInfo that says where the padding is
        q, _ = seqpar.shard(full[:, :30], 1, return_info=True)
        seqpar.attention(q, q, q, causal=True)


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


def _problem(shape, layout, m, cu_seqlens, seed=0, dtype="float32", device="cpu"):
    """This rank's shards (leaves requiring grad) and output gradient of a seeded problem, via seqpar.shard."""
    q, k, v, do = (t.to(device, DTYPES[dtype]) for t in qkv(shape, seed))
    return [seqpar.shard(t, 1, layout=layout, mesh=m, cu_seqlens=cu_seqlens).detach().requires_grad_(i < 3)
            for i, t in enumerate((q, k, v, do))]


def compiled_vs_eager(strategy: str, cases, degrees=None, backend: str = "aot_eager", shape=(1, 64, 4, 2, 8),
                      device: str = "cpu"):
    """For each case (causal, cu_seqlens, window): eager and ``torch.compile(fullgraph=True)`` seqpar.attention,
    forward and backward, on this rank; the largest difference of out, dq, dk, dv, and whether any graph broke."""
    from torch._dynamo.utils import counters

    m = mesh(**(degrees or {}))
    results = []
    for causal, cu, window in cases:
        torch._dynamo.reset()
        counters.clear()

        def f(q, k, v):
            return seqpar.attention(q, k, v, causal=causal, strategy=strategy, mesh=m, cu_seqlens=cu, window=window)

        got = []
        for fn in (f, torch.compile(f, fullgraph=True, backend=backend)):
            q, k, v, do = _problem(shape, "zigzag", m, cu, device=device)
            out = fn(q, k, v)
            out.backward(do)
            got.append([out.detach(), q.grad, k.grad, v.grad])
        results.append({"diff": max((a - b).abs().max().item() for a, b in zip(*got)),
                        "breaks": sum(counters["graph_break"].values())})
    return results


_READS: list[str] = []


def _where() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-2] if "/seqpar/" in f.filename]
    return f"{frames[-1].filename.split('/seqpar/')[-1]}:{frames[-1].lineno}" if frames else "?"


def _trap(name, real):
    """``real``, recording that tensor data was read on the host (ranks carry on, so none hangs)."""
    def trapped(*args, **kwargs):
        _READS.append(f"{name} at {_where()}")
        return real(*args, **kwargs)
    return trapped


def _trap_getitem(real):
    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            _READS.append(f"boolean-mask indexing at {_where()}")
        return real(self, index)
    return getitem


TRAPPED = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "unique",
           "masked_select")


def no_host_reads_after_planning(strategy: str, cases, degrees=None, shape=(1, 64, 4, 2, 8), dtype="float32"):
    """Run each case once (the plan is built: its host reads are allowed), then forward and backward again with
    every host read of tensor data recorded (``.item()``, ``bool()``, ``int()``, ``.tolist()``, ``nonzero``,
    boolean indexing, ``torch.equal``...).  Returns what was read, per case (empty: nothing)."""
    m = mesh(**(degrees or {}))
    reads = []
    for causal, cu, window in cases:
        for trapped in (False, True):
            q, k, v, do = _problem(shape, "zigzag", m, cu, dtype=dtype)
            saved = {name: getattr(torch.Tensor, name) for name in TRAPPED}
            saved.update({"[]": torch.Tensor.__getitem__, "torch.equal": torch.equal, "torch.nonzero": torch.nonzero})
            _READS.clear()
            try:
                if trapped:
                    for name in TRAPPED:
                        setattr(torch.Tensor, name, _trap(f"Tensor.{name}", saved[name]))
                    torch.Tensor.__getitem__ = _trap_getitem(saved["[]"])
                    torch.equal, torch.nonzero = _trap("torch.equal", torch.equal), _trap("torch.nonzero", torch.nonzero)
                out = seqpar.attention(q, k, v, causal=causal, strategy=strategy, mesh=m, cu_seqlens=cu,
                                       window=window)
                out.backward(do)
            finally:
                for name in TRAPPED:
                    setattr(torch.Tensor, name, saved[name])
                torch.Tensor.__getitem__ = saved["[]"]
                torch.equal, torch.nonzero = saved["torch.equal"], saved["torch.nonzero"]
            if trapped and _READS:
                reads.append(f"{strategy} causal={causal} cu_seqlens={cu} window={window}: {sorted(set(_READS))}")
    return reads


def train_llama_compiled(strategy: str, compiled: bool, degrees=None, steps: int = 3):
    """A few AdamW steps of the tiny seqpar Llama (sharded ids, the sp-aware loss) with every decoder block
    ``torch.compile(fullgraph=True)`` d or eager; the losses and the final single-device state."""
    from seqpar.models import LlamaForCausalLM
    from seqpar.train import causal_lm_loss, shift_labels, sync_gradients

    m = mesh(**(degrees or {}))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM("tiny", mesh=m, strategy=strategy)
    model.init_weights(seed=0)
    if compiled:
        for block in model.layers:
            block.compile(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    ids_l = seqpar.shard(ids, 1, mesh=m)
    labels_l = seqpar.shard(shift_labels(ids), 1, mesh=m, pad_value=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = causal_lm_loss(model(ids_l), labels_l, m)
        out.loss.backward()
        sync_gradients(model, m)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.value))
    return {"losses": losses, "state": model.full_state_dict()}


def run_cuda_dispatch(strategy: str, causal: bool, cu_seqlens, window, degrees=None, shape=(1, 64, 4, 2, 8)):
    """seqpar.attention in bfloat16 with the CUDA dispatch mocked (tests.core.cuda_mock): the full outputs and
    gradients (gathered by unshard), the kernels that ran, and the varlen calls' arguments."""
    from tests.core.cuda_mock import cuda_dispatch

    m = mesh(**(degrees or {}))
    q, k, v, do = (t.bfloat16().requires_grad_(i < 3) for i, t in enumerate(qkv(shape, 0)))
    with cuda_dispatch() as calls, seqpar.stats.track() as st:
        ql, kl, vl, dol = (seqpar.shard(t, 1, mesh=m, cu_seqlens=cu_seqlens) for t in (q, k, v, do))
        out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, mesh=m, cu_seqlens=cu_seqlens,
                               window=window)
        kernels_fwd = dict(st.kernels)
        out.backward(dol.detach())
    full = seqpar.unshard(out.detach(), 1, mesh=m, cu_seqlens=cu_seqlens)
    return {"out": full, "dq": q.grad, "dk": k.grad, "dv": v.grad, "kernels": kernels_fwd,
            "ops": sorted({c["op"] for c in calls})}
