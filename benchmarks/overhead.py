"""Host overhead per attention call: tiny shapes, every seqpar strategy beside PyTorch's ring core and DeepSpeed.

At B=1, S=16*N, H=4, D=16 the kernels cost microseconds, so a forward+backward call's time is what
the framework spends around them: argument checks, plans, Python, and the collectives' latency.
Each rank measures, per call, the wall time and the CPU time of its calling thread (gloo's
transfers run on gloo's own threads and the caller sleeps while it waits, so this is the host
work: Python, dispatch, small kernels); a round's figure is the slowest rank's, the table the
median over rounds.  Sides (the peers as in ``benchmarks/peers.py``, on the same shards):

* ``seqpar <strategy>`` for every strategy (usp on a 2 x N/2 mesh), zigzag except ulysses
  (contiguous, as DeepSpeed needs);
* ``torch_ring`` / ``torch_ring_a2a``: ``_templated_ring_attention`` (+ backward) with the CPU flash
  ops, all-gather or all-to-all rotation, head-tail (zigzag) balanced;
* ``deepspeed``: ``deepspeed.sequence.layer.DistributedAttention`` around SDPA.

Run through ``python benchmarks/peers.py --overhead`` (or this file directly).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

_MESHES: dict = {}


def _mesh(n: int):
    import seqpar

    if n not in _MESHES:
        _MESHES[n] = (seqpar.init(sp=n), seqpar.init(sp=n, ulysses=2) if n >= 4 and n % 2 == 0 else None)
    return _MESHES[n]


def _sides(cfg, n, rank):
    """name -> (step(leaves) -> out BSHD, leaves) for every side available in this process."""
    import peers

    import seqpar
    from seqpar.core.layout import get_layout

    flat, two_d = _mesh(n)
    s, h, hkv, d = cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q, k, v, do = peers._inputs(1, s, h, hkv, d, torch.float32)
    shards = {lay: [t[:, get_layout(lay).indices(s, n, rank)].contiguous() for t in (q, k, v, do)]
              for lay in ("zigzag", "contiguous")}
    sides = {}
    for strategy in seqpar.STRATEGIES:
        lay = "contiguous" if strategy == "ulysses" else "zigzag"
        m = two_d if strategy == "usp" else flat
        if m is None:
            continue
        local = ([t[:, idx] for t in (q, k, v, do)] if strategy == "usp" and
                 (idx := seqpar.shard(torch.arange(s)[None], 1, mesh=m)[0]) is not None else shards[lay])

        def step(t, strategy=strategy, lay=lay, m=m):
            return seqpar.attention(*t, causal=True, strategy=strategy, layout=lay, mesh=m)
        sides[f"seqpar {strategy}"] = (step, [x.contiguous() for x in local])
    group = flat.sp_group
    z = shards["zigzag"]
    for name, rotate in (("torch_ring", "allgather"), ("torch_ring_a2a", "alltoall")):
        def torch_step(t, rotate=rotate):
            o = peers._TorchRingAttention.apply(*t, group, True, rotate, d ** -0.5)
            return o.transpose(1, 2)
        sides[name] = (torch_step, [x.transpose(1, 2).contiguous() for x in z[:3]] + [z[3]])
    try:
        cls, _ = peers._deepspeed(group)
        attn = cls(peers._LocalSDPA(True), group, scatter_idx=2, gather_idx=1)
        sides["deepspeed"] = (lambda t, attn=attn: attn(*t, batch_dim_idx=0), shards["contiguous"])
    except ImportError as exc:
        print(f"deepspeed not importable: {exc}", file=sys.stderr)
    return sides


def bench_overhead(cfg: dict):
    """Worker task: per side, wall and calling-thread CPU seconds per forward+backward call, per round."""
    import torch.distributed as dist

    import seqpar

    n, rank = dist.get_world_size(), dist.get_rank()
    sides = _sides(cfg, n, rank)
    runs, colls = {}, {}
    for name, (step, (q, k, v, do)) in sides.items():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def call(step=step, leaves=leaves, do=do):
            out = step(leaves)
            grads = torch.autograd.grad(out, leaves, do.transpose(1, 2) if out.shape != do.shape else do)
            return grads
        runs[name] = call
        with seqpar.stats.track() as st:
            call()
        colls[name] = sum(st.calls.values()) if name.startswith("seqpar") else None
    names = list(runs)
    for _ in range(cfg["warmup"]):
        for name in names:
            runs[name]()
    times = {name: [] for name in names}
    for r in range(cfg["reps"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(cfg["inner"]):
                runs[name]()
            times[name].append(((time.perf_counter() - w0) / cfg["inner"], (time.thread_time() - c0) / cfg["inner"]))
    dist.barrier()
    return {"times": times, "collectives": colls}


def table(n: int, res, reps: int) -> list[str]:
    rows = []
    names = list(res[0]["times"])
    for name in names:
        wall = statistics.median(max(r["times"][name][i][0] for r in res) for i in range(reps))
        cpu = statistics.median(max(r["times"][name][i][1] for r in res) for i in range(reps))
        colls = res[0]["collectives"][name]
        rows.append((name, wall, cpu, colls))
    peers = {name: (w, c) for name, w, c, _ in rows if not name.startswith("seqpar")}
    out = []
    for name, wall, cpu, colls in rows:
        vs = ""
        if name.startswith("seqpar") and peers:
            vs = " / ".join(f"{cpu / pc:.2f}" for pw, pc in peers.values())
        out.append(f"| {n} | {name} | {wall * 1e6:.0f} | {cpu * 1e6:.0f} | {'' if colls is None else colls} | {vs} |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=20, help="calls per round and side")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--tokens-per-rank", type=int, default=16)
    ns = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks import peers and this file as modules
    import overhead as this

    from seqpar.launch.pool import WorkerPool

    print(f"# host overhead per forward+backward call, CPU gloo, float32, B=1, {ns.tokens_per_rank} tokens/rank, "
          f"H/Hkv={ns.heads}/{ns.kv_heads}, D={ns.head_dim}, causal; median over {ns.reps} rounds of {ns.inner} calls, "
          f"slowest rank; host CPU = the calling thread's CPU time")
    print("# command: python benchmarks/peers.py --overhead " + " ".join(sys.argv[2:] if argv is None else argv))
    print("\n| N | side | wall us/call | host CPU us/call | seqpar collectives/call | host CPU vs peers "
          "(torch_ring / torch_ring_a2a / deepspeed) |\n|---|---|---|---|---|---|")
    for n in ns.nproc:
        cfg = dict(seq_len=ns.tokens_per_rank * n, heads=ns.heads, kv_heads=ns.kv_heads, head_dim=ns.head_dim,
                   reps=ns.reps, inner=ns.inner, warmup=ns.warmup)
        with WorkerPool(n, threads_per_rank=1, timeout=600) as pool:
            res = pool.run(this.bench_overhead, cfg)
        for row in table(n, res, ns.reps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
