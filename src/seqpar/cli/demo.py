"""``seqpar demo``: every attention strategy on local ranks, checked against one device.

Starts ``--nproc`` local ranks (gloo on CPU), shards one causal GQA problem in
the zigzag layout, runs forward and backward with each strategy, and prints
the largest error of the output and of dq/dk/dv against single-device
``scaled_dot_product_attention``, with time and bytes sent per rank.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

__all__ = ["add_parser", "run_strategy"]

STRATEGIES = ("ring", "ulysses", "allgather", "ring_qk_av")


def _problem(args: dict):
    g = torch.Generator().manual_seed(0)
    b, s, h, hkv, d = args["batch"], args["seq_len"], args["heads"], args["kv_heads"], args["head_dim"]
    shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
    return [torch.randn(*sh, generator=g, dtype=torch.float32) for sh in shapes]


def run_strategy(strategy: str, args: dict):
    """Worker task: this rank's shards through seqpar.attention; returns output/grad shards and stats."""
    import seqpar
    from seqpar.layout import get_layout

    mesh = seqpar.get_mesh() or seqpar.init()
    n, r = mesh.sp, mesh.rank("sp")
    q, k, v, do = _problem(args)
    idx = get_layout(args["layout"]).indices(q.shape[1], n, r)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    with seqpar.stats.track() as st:
        t0 = time.perf_counter()
        out = seqpar.attention(ql, kl, vl, causal=True, strategy=strategy, layout=args["layout"])
        out.backward(do[:, idx])
        elapsed = time.perf_counter() - t0
    return {"idx": idx, "out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
            "time": elapsed, "bytes": sum(st.bytes.values()), "pairs": st.pairs}


def _reference(args: dict):
    q, k, v, do = _problem(args)
    q64, k64, v64 = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    out.backward(do.double().transpose(1, 2))
    ref = [t.transpose(1, 2).detach() for t in (out, q64.grad, k64.grad, v64.grad)]
    qs, ks, vs = (t.transpose(1, 2).clone().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    o.backward(do.transpose(1, 2))
    single_time = time.perf_counter() - t0
    single = [t.transpose(1, 2).detach() for t in (o, qs.grad, ks.grad, vs.grad)]
    return ref, single, single_time


def _assemble(results, key, seq_len):
    first = results[0][key]
    full = first.new_empty((first.shape[0], seq_len) + tuple(first.shape[2:]))
    for res in results:
        full[:, res["idx"]] = res[key]
    return full


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def demo(ns: argparse.Namespace) -> int:
    from ..workers import WorkerPool

    args = {k: getattr(ns, k) for k in ("batch", "seq_len", "heads", "kv_heads", "head_dim", "layout")}
    strategies = STRATEGIES if ns.strategy == "all" else (ns.strategy,)
    print(f"seqpar demo: causal attention, B={ns.batch} S={ns.seq_len} H={ns.heads} Hkv={ns.kv_heads} "
          f"D={ns.head_dim}, layout={ns.layout}, {ns.nproc} local ranks (gloo, CPU)")
    ref, single, single_time = _reference(args)
    keys = ("out", "dq", "dk", "dv")
    budget = max(_err(s, r) for s, r in zip(single, ref))
    print(f"single device (float32 SDPA): max error vs float64 {budget:.1e}, fwd+bwd {single_time * 1e3:.0f} ms\n")
    header = f"{'strategy':<11}{'world':>6}{'max err':>10}{'fwd+bwd ms':>12}{'MB sent/rank':>14}{'work/rank':>11}  ok"
    print(header + "\n" + "-" * len(header))
    failures = 0
    with WorkerPool(ns.nproc, threads_per_rank=1) as pool:
        for strategy in strategies:
            res = pool.run(run_strategy, strategy, args)  # warm-up: first P2P/collective connections
            res = pool.run(run_strategy, strategy, args)
            err = max(_err(_assemble(res, key, ns.seq_len), r) for key, r in zip(keys, ref))
            ok = err <= 2 * budget + 1e-6
            failures += not ok
            pairs = [r_["pairs"] for r_ in res]
            balance = f"{min(pairs) / max(pairs):.2f}" if max(pairs) else "-"
            print(f"{strategy:<11}{ns.nproc:>6}{err:>10.1e}{max(r_['time'] for r_ in res) * 1e3:>12.0f}"
                  f"{max(r_['bytes'] for r_ in res) / 2**20:>14.2f}{balance:>11}  {'yes' if ok else 'NO'}")
    print("\nmax err: largest |difference| of out, dq, dk, dv against float64; work/rank: min/max attention work "
          "over ranks (1.00 = balanced).")
    return 1 if failures else 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run every attention strategy on local ranks and check it against one device")
    p.add_argument("--nproc", type=int, default=4, help="local ranks to start (default 4)")
    p.add_argument("--strategy", default="all", choices=("all",) + STRATEGIES)
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous", "stripe"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.set_defaults(func=demo)
