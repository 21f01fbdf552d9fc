"""Attention strategies against single-device SDPA, in one run.

Two modes:

* distributed (default): ``--nproc`` local ranks (gloo; on ``--device cuda`` all
  ranks share cuda:0, the only way to run several ranks on one GPU), each
  strategy's forward+backward time (max over ranks, median of ``--reps``), its
  ratio to single-device SDPA on the whole sequence timed in the same worker
  processes, activation bytes saved for backward per rank, and on CUDA the peak
  memory per rank.
* ``--emulate-ring``: one process, one GPU: the decomposition efficiency of a
  ring rank, ``(single-device attention time / N) / (one rank's ring compute)``,
  running the ring's own block loop (layout tasks, fused kernels, float32
  merge) on the blocks a rank would receive, without communication.  With
  ``--backward`` the backward loop is timed too.

Examples::

    python benchmarks/attention.py --nproc 4 --seq-lens 1024 2048 4096
    python benchmarks/attention.py --emulate-ring --device cuda --dtype bfloat16 \\
        --heads 32 --kv-heads 32 --head-dim 128 --nproc 8 --seq-lens 32768 131072
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seqpar.core.stats import saved_activations

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRATEGIES = ["ring", "ulysses", "allgather", "ring_qk_av"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _inputs(b, s, h, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
    return [torch.randn(*sh, generator=g).to(device=device, dtype=dtype) for sh in shapes]


def _time(fn, device, reps):
    fn()  # warm-up (first collectives open connections; kernels pick algorithms)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_rank(cfg: dict):
    """Worker task: time every strategy and (on rank 0) single-device SDPA for one sequence length."""
    import torch.distributed as dist

    import seqpar
    from seqpar.core.layout import get_layout

    device, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    if device == "cuda":
        torch.cuda.set_device(0)
    mesh = seqpar.get_mesh() or seqpar.init()
    n, r = mesh.sp, mesh.rank("sp")
    q, k, v, do = _inputs(cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], dtype, device)
    out = {}
    for strategy in cfg["strategies"]:
        idx = get_layout(cfg["layout"]).indices(cfg["seq_len"], n, r).to(device)
        ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
        dol = do[:, idx]

        def step():
            o = seqpar.attention(ql, kl, vl, causal=cfg["causal"], strategy=strategy, layout=cfg["layout"])
            o.backward(dol)

        dist.barrier()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = _time(step, device, cfg["reps"])
        with saved_activations() as saved:
            o = seqpar.attention(ql, kl, vl, causal=cfg["causal"], strategy=strategy, layout=cfg["layout"])
        del o
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        out[strategy] = {"time": t, "saved": saved.bytes, "peak": peak}
    dist.barrier()
    if r == 0:  # single-device baseline on the whole sequence, in the same kind of process
        qs, ks, vs = (t.transpose(1, 2).clone().requires_grad_() for t in (q, k, v))

        def single():
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=cfg["causal"], enable_gqa=True)
            o.backward(do.transpose(1, 2))

        out["single"] = {"time": _time(single, device, cfg["reps"])}
        with saved_activations() as saved:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=cfg["causal"], enable_gqa=True)
        out["single"]["saved"] = saved.bytes
    dist.barrier()
    return out


def run_distributed(ns) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks import this file as a module
    from seqpar.launch.pool import WorkerPool

    print(f"# attention fwd+bwd, {ns.nproc} ranks on {ns.device} (gloo), {ns.dtype}, B={ns.batch} H={ns.heads} "
          f"Hkv={ns.kv_heads} D={ns.head_dim}, causal={ns.causal}, layout={ns.layout}; median of {ns.reps}")
    print("| S | strategy | ms (max over ranks) | x single-device SDPA | saved MB/rank | saved vs single |"
          + (" peak MB/rank |" if ns.device == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|" if ns.device == "cuda" else ""))
    import attention as this  # noqa: F401  (the module the ranks import)

    with WorkerPool(ns.nproc, threads_per_rank=ns.threads) as pool:
        for s in ns.seq_lens:
            cfg = {k: getattr(ns, k) for k in ("device", "dtype", "batch", "heads", "kv_heads", "head_dim",
                                               "causal", "layout", "reps")}
            cfg.update(seq_len=s, strategies=ns.strategies)
            res = pool.run(this.bench_rank, cfg)
            single = res[0]["single"]
            print(f"| {s} | single-device SDPA | {single['time'] * 1e3:.1f} | 1.00 | {single['saved'] / 2**20:.1f} | 1.00 |"
                  + (" - |" if ns.device == "cuda" else ""))
            for strategy in ns.strategies:
                t = max(r_[strategy]["time"] for r_ in res)
                saved = max(r_[strategy]["saved"] for r_ in res)
                line = (f"| {s} | {strategy} | {t * 1e3:.1f} | {t / single['time']:.2f} | {saved / 2**20:.1f} | "
                        f"{saved / single['saved']:.2f} |")
                if ns.device == "cuda":
                    line += f" {max(r_[strategy]['peak'] for r_ in res) / 2**20:.0f} |"
                print(line, flush=True)


def drift_rank(strategy: str, shape, seed: int):
    """Worker task: bf16 shards through the strategy; returns output and grad shards with their positions."""
    import seqpar
    from seqpar.core.layout import get_layout

    mesh = seqpar.get_mesh() or seqpar.init()
    b, s, h, hkv, d = shape
    q, k, v, do = _inputs(b, s, h, hkv, d, torch.float64, "cpu", seed)
    idx = get_layout("zigzag").indices(s, mesh.sp, mesh.rank("sp"))
    ql, kl, vl = (t[:, idx].bfloat16().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, causal=True, strategy=strategy)
    out.backward(do[:, idx].bfloat16())
    return idx, [out.detach(), ql.grad, kl.grad, vl.grad]


def run_drift(ns) -> None:
    """bf16 error against float64 per world size, as a multiple of the single-device bf16 kernel's error."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import attention as this  # noqa: F401  (the module the ranks import)
    from seqpar.launch.pool import WorkerPool

    shape = (ns.batch, ns.seq_lens[0], ns.heads, ns.kv_heads, ns.head_dim)
    q, k, v, do = _inputs(*shape, torch.float64, "cpu", 0)

    def sdpa(dtype):
        qs, ks, vs = (t.to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        o.backward(do.to(dtype).transpose(1, 2))
        return [t.transpose(1, 2).double() for t in (o.detach(), qs.grad, ks.grad, vs.grad)]

    exact, single = sdpa(torch.float64), sdpa(torch.bfloat16)
    budget = [(a - e).abs().max().item() for a, e in zip(single, exact)]
    print(f"# bf16 drift, causal zigzag, B={shape[0]} S={shape[1]} H={shape[2]} Hkv={shape[3]} D={shape[4]}: "
          f"max |error| vs float64 / the single-device bf16 SDPA's (out, dq, dk, dv)")
    print("| strategy | world | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|")
    for strategy in ns.strategies:
        for world in ns.worlds:
            with WorkerPool(world) as pool:
                res = pool.run(this.drift_rank, strategy, shape, 0)
            ratios = []
            for i, e in enumerate(exact):
                full = torch.empty_like(e)
                for idx, tensors in res:
                    full[:, idx] = tensors[i].double()
                ratios.append((full - e).abs().max().item() / budget[i])
            print(f"| {strategy} | {world} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


def _emulated_plans(ns, s: int, mask: str):
    """(plan over N ranks, plan over the whole sequence on one rank, causal) for a mask of the emulated ring."""
    from seqpar.attention.plans import LayoutPlan, MetaPlan
    from seqpar.core.layout import get_layout
    from seqpar.core.packing import seq_info

    lay, n = get_layout(ns.layout), ns.nproc
    causal = mask != "full"
    if mask in ("causal", "full"):
        return LayoutPlan(lay, n, s // n, causal), None, causal
    window = (ns.window, 0) if mask == "window" else None
    cu = list(range(0, s, ns.doc_len)) + [s] if mask == "packed" else [0, s]
    info = seq_info(lay, n, cu_seqlens=cu)
    whole = seq_info(lay, 1, cu_seqlens=cu)
    metas = [info.meta(r) for r in range(n)]
    if info.padding:
        raise SystemExit(f"--doc-len {ns.doc_len} does not split over {n} ranks in {ns.layout}: pick a multiple of "
                         f"{n * lay.granule}")
    return MetaPlan(metas, causal, window), MetaPlan([whole.meta(0)], causal, window), causal


def _rank_times(ns, plan, q, k, v, do, out_full, lse_full, r, fused, scale, backend):
    """(forward s, backward s or None) of ring rank ``r``'s block loop, blocks already on the device."""
    from seqpar.attention.blocks import backward_block, empty_accumulators, forward_block

    device, n = ns.device, plan.n
    lay_idx = [_rank_index(plan, ns, src, q.shape[1]).to(device) for src in range(n)]
    ql = q[:, lay_idx[r]]
    kv = [(k[:, lay_idx[src]], v[:, lay_idx[src]]) for src in range(n)]
    blocks = [plan.block(r, src, device, fused) for src in range(n)]

    def forward():
        acc_out, acc_lse = empty_accumulators(ql)
        for (kb, vb), block in zip(kv, blocks):
            if not block.empty:
                forward_block(ql, kb, vb, block, acc_out, acc_lse, scale=scale, backend=backend)

    t_fwd = _time(forward, device, ns.reps)
    if not ns.backward:
        return t_fwd, None
    dol, out_l, lse_l = do[:, lay_idx[r]], out_full[:, lay_idx[r]], lse_full[:, :, lay_idx[r]]

    def backward():
        dq = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        for (kb, vb), block in zip(kv, blocks):
            dk = torch.zeros(kb.shape, dtype=torch.float32, device=device)
            dv = torch.zeros_like(dk)
            if not block.empty:
                backward_block(dol, ql, kb, vb, out_l, lse_l, block, dq, dk, dv, scale=scale, backend=backend)

    return t_fwd, _time(backward, device, ns.reps)


def _rank_index(plan, ns, rank: int, s: int) -> torch.Tensor:
    """Global positions ring rank ``rank`` holds (the plan's layout, packed documents laid out one by one)."""
    from seqpar.core.layout import get_layout
    from seqpar.core.packing import seq_info

    if hasattr(plan, "layout"):
        return plan.layout.indices(s, plan.n, rank)
    cu = list(range(0, s, ns.doc_len)) + [s] if ns.current_mask == "packed" else [0, s]
    return seq_info(get_layout(ns.layout), plan.n, cu_seqlens=cu).indices(rank)


def run_emulated_ring(ns) -> None:
    """Decomposition efficiency of one ring rank, on one device, no communication; masked paths per visible pair."""
    from seqpar.attention.blocks import empty_accumulators, forward_block
    from seqpar.core.kernels import attention_with_lse, pick_backend, varlen_supported

    device, dtype, n = ns.device, DTYPES[ns.dtype], ns.nproc
    torch.set_num_threads(ns.threads)  # on a shared CPU, idle OpenMP threads stall small elementwise ops
    print(f"# emulated ring rank: N={n}, {ns.dtype}, B={ns.batch} H={ns.heads} Hkv={ns.kv_heads} D={ns.head_dim}, "
          f"{device}, layout {ns.layout}; efficiency = (single-device time / N) / (worst rank's ring compute); "
          f"ms per 1G pairs: worst rank per 10^9 visible query-key pairs (x H x B), vs the causal mask's; "
          f"median of {ns.reps}; packed: documents of {ns.doc_len}, window: ({ns.window}, 0) causal")
    print("| S | mask | pass | kernels | single ms | single/N ms | worst rank ms | efficiency | pairs/rank (M) | "
          "ms per 1G pairs | vs causal per pair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in ns.seq_lens:
        q, k, v, do = _inputs(ns.batch, s, ns.heads, ns.kv_heads, ns.head_dim, dtype, device)
        backend = pick_backend(q, ns.backend)
        fused = varlen_supported(q, backend)
        scale = ns.head_dim ** -0.5
        per_pair = {}
        for mask in ns.masks:
            ns.current_mask = mask
            plan, whole, causal = _emulated_plans(ns, s, mask)
            kern = "fused varlen" if fused and whole is not None else backend
            if whole is None:
                single = lambda: attention_with_lse(q, k, v, causal=causal, backend=backend)  # noqa: E731
            else:  # one device: the same masks as one block (packed: one varlen call over every document)
                block = whole.block(0, 0, device, fused)

                def single(block=block):
                    acc_out, acc_lse = empty_accumulators(q)
                    forward_block(q, k, v, block, acc_out, acc_lse, scale=scale, backend=backend)
                    return acc_out.to(q.dtype), acc_lse
            t_single = _time(single, device, ns.reps)
            out_full = lse_full = None
            if ns.backward:
                qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
                out_full, lse_full = (attention_with_lse(qs, ks, vs, causal=causal, backend=backend) if whole is None
                                      else single())
                out_full = out_full.detach()
            worst_f = worst_b = 0.0
            pairs = 0
            for r in range(n) if causal else [0]:  # non-causal: every rank does the same work
                t_f, t_b = _rank_times(ns, plan, q, k, v, do, out_full, lse_full, r, fused and whole is not None,
                                       scale, backend)
                worst_f, worst_b = max(worst_f, t_f), max(worst_b, t_b or 0.0)
                pairs = max(pairs, plan.work(r, fused and whole is not None)[0])
            for pass_, worst in (("fwd", worst_f), ("bwd", worst_b)) if ns.backward else (("fwd", worst_f),):
                if pass_ == "bwd":
                    out_g, inputs_g, do_g = _grad_args(q, k, v, do, causal, backend, whole)
                    t_single = _time(lambda: torch.autograd.grad(out_g, inputs_g, do_g, retain_graph=True), device,
                                     ns.reps)
                rate = worst / (pairs * ns.heads * ns.batch) * 1e9
                per_pair.setdefault(pass_, {})[mask] = rate
                base = per_pair[pass_].get("causal")
                print(f"| {s} | {mask} | {pass_} | {kern} | {t_single * 1e3:.2f} | {t_single / n * 1e3:.2f} | "
                      f"{worst * 1e3:.2f} | {(t_single / n) / worst:.2f} | {pairs / 1e6:.1f} | {rate * 1e3:.3f} | "
                      f"{'' if base is None else f'{rate / base:.2f}'} |", flush=True)


def _grad_args(q, k, v, do, causal, backend, whole):
    """(out, inputs, grad) of the single-device forward, for timing its backward."""
    from seqpar.core.kernels import attention_with_lse

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    if whole is None:
        out, _ = attention_with_lse(qs, ks, vs, causal=causal, backend=backend)
        return out, (qs, ks, vs), do
    import seqpar

    out = seqpar.attention(qs, ks, vs, causal=causal, mesh=seqpar.Mesh(), backend=backend,
                           cu_seqlens=[c for c in _whole_cu(whole)], window=getattr(whole, "window", None))
    return out, (qs, ks, vs), do


def _whole_cu(whole) -> list[int]:
    doc = whole.metas[0].doc
    starts = [0] + (torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1).tolist() + [doc.numel()]
    return starts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (and in --emulate-ring)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--emulate-ring", action="store_true", help="decomposition efficiency of one ring rank")
    p.add_argument("--drift", action="store_true", help="bf16 error vs world size (first --seq-lens entry)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8], help="(drift) world sizes")
    p.add_argument("--masks", nargs="+", default=["causal", "full"], choices=("causal", "full", "packed", "window"),
                   help="(emulate-ring) masks to measure: packed documents of --doc-len, a causal --window")
    p.add_argument("--doc-len", type=int, default=16384, help="(emulate-ring, packed) tokens per document")
    p.add_argument("--window", type=int, default=4096, help="(emulate-ring, window) tokens to the left")
    p.add_argument("--backward", action="store_true", help="(emulate-ring) time the backward loop too")
    p.add_argument("--backend", default="auto", help="(emulate-ring) local kernel: auto, cudnn, flash, ...")
    ns = p.parse_args()
    if ns.drift:
        run_drift(ns)
    elif ns.emulate_ring:
        run_emulated_ring(ns)
    else:
        run_distributed(ns)


if __name__ == "__main__":
    main()
