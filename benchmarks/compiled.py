"""seqpar.attention under torch.compile(fullgraph=True) against eager, forward and backward, on local ranks.

For each strategy: the compiled function (``--backend``, default inductor) must give eager's output and
gradients (max |difference| printed), and the time per forward+backward call of both (median of
``--reps`` after the compile, max over ranks) and the first call's (compile) time.  Packed documents
and a sliding window run too (``--packed`` documents of ``--doc-len``, ``--window``).  On ``--device
cuda`` every rank shares cuda:0 over gloo (the ring's transfers then go through all-to-all).

Example (what benchmarks/gpu_checks.sh runs)::

    python benchmarks/compiled.py --device cuda --dtype bfloat16 --nproc 2 --seq-len 16384 \\
        --heads 16 --kv-heads 4 --head-dim 128 --strategies ring ulysses
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(cfg: dict):
    """Worker task: eager vs compiled for one strategy and mask; (max difference, eager s, compiled s, compile s)."""
    import seqpar

    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(0)
    mesh = seqpar.get_mesh() or seqpar.init(sp=cfg["nproc"], ulysses=cfg["ulysses"])
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    s, h, hkv, d = cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    full = [torch.randn(1, s, n, d, generator=g).to(device, DTYPES[cfg["dtype"]]) for n in (h, hkv, hkv, h)]
    cu = cfg["cu_seqlens"]
    q, k, v, do = (seqpar.shard(t, 1, mesh=mesh, cu_seqlens=cu).contiguous() for t in full)

    def step(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, do)
        return [out.detach(), *grads]

    def attend(q, k, v):
        return seqpar.attention(q, k, v, causal=True, strategy=cfg["strategy"], mesh=mesh, cu_seqlens=cu,
                                window=cfg["window"])

    compiled = torch.compile(attend, fullgraph=True, backend=cfg["backend"])
    _sync(device)
    t0 = time.perf_counter()
    got = step(compiled)
    _sync(device)
    compile_s = time.perf_counter() - t0
    want = step(attend)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
    times = {}
    for name, fn in (("eager", attend), ("compiled", compiled)):
        ts = []
        for _ in range(cfg["reps"]):
            torch.distributed.barrier()
            _sync(device)
            t0 = time.perf_counter()
            step(fn)
            _sync(device)
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    return {"diff": diff, "eager": times["eager"], "compiled": times["compiled"], "compile": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--strategies", nargs="+", default=["ring", "ulysses", "allgather", "usp"])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--doc-len", type=int, default=0, help="also packed documents of this many tokens (0: no)")
    p.add_argument("--window", type=int, default=0, help="also a causal sliding window of this many tokens (0: no)")
    p.add_argument("--reps", type=int, default=5)
    ns = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks import this file as a module
    import compiled as this

    from seqpar.launch.pool import WorkerPool

    masks = [("causal", None, None)]
    if ns.doc_len:
        masks.append(("packed", list(range(0, ns.seq_len, ns.doc_len)) + [ns.seq_len], None))
    if ns.window:
        masks.append(("window", None, (ns.window, 0)))
    print(f"# torch.compile(fullgraph=True, backend={ns.backend}) vs eager, fwd+bwd, {ns.nproc} ranks on {ns.device} "
          f"(gloo), {ns.dtype}, S={ns.seq_len} H={ns.heads} Hkv={ns.kv_heads} D={ns.head_dim}; median of {ns.reps}, "
          f"slowest rank")
    print("| strategy | mask | max diff compiled vs eager | eager ms | compiled ms | compiled/eager | first call s |")
    print("|---|---|---|---|---|---|---|")
    for strategy in ns.strategies:
        ulysses = 2 if strategy == "usp" else 1
        if strategy == "usp" and ns.nproc < 4:
            print("| usp | - | needs --nproc >= 4 | | | | |")
            continue
        with WorkerPool(ns.nproc, timeout=900) as pool:
            for mask, cu, window in masks:
                cfg = dict(vars(ns), strategy=strategy, ulysses=ulysses, cu_seqlens=cu, window=window)
                res = pool.run(this.bench, cfg)
                worst = {key: max(r[key] for r in res) for key in ("diff", "eager", "compiled", "compile")}
                print(f"| {strategy} | {mask} | {worst['diff']:.1e} | {worst['eager'] * 1e3:.2f} | "
                      f"{worst['compiled'] * 1e3:.2f} | {worst['compiled'] / worst['eager']:.2f} | "
                      f"{worst['compile']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
