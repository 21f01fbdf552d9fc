"""seqpar against its peers, side by side on the same inputs, in one run (CPU, gloo).

Pairs (``--pairs``):

* ``ulysses``: ``seqpar.attention(strategy="ulysses")`` against DeepSpeed's
  ``deepspeed.sequence.layer.DistributedAttention`` wrapping
  ``F.scaled_dot_product_attention``.  DeepSpeed is used on ``[B, S/N, H, D]``
  shards with ``batch_dim_idx=0, scatter_idx=2, gather_idx=1``.  Its all-to-all
  gathers the sequence in rank-major order, so it is exact only on the
  ``contiguous`` layout: both sides get contiguous shards.
* ``ring``: ``seqpar.attention(strategy="ring")`` against PyTorch's own ring core,
  ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` from
  ``torch.distributed.tensor.experimental._context_parallel._attention`` (the
  engine behind ``context_parallel``, whose public entry point has no CPU
  sharding strategy), wrapped in an autograd Function and handed the CPU flash
  ops ``aten._scaled_dot_product_flash_attention_for_cpu(_backward)``.  Inputs are
  ``[B, H, S/N, D]`` zigzag (PyTorch: head-tail) shards of the same tensors
  seqpar gets as ``[B, S/N, H, D]``; causal runs use PyTorch's head-tail load
  balance (``_cp_options.enable_load_balance``), non-causal runs must turn it
  off.  Peer variants: ``torch_ring`` (default all-gather K/V rotation),
  ``torch_ring_a2a`` (``set_rotate_method("alltoall")``: one all_to_all per
  step) and, for GQA, ``torch_ring_repkv`` (K/V repeated to the query heads
  before the ring, as a caller whose kernel lacks native GQA must do).

For every configuration each rank checks every side against single-device SDPA
(forward and the gradients of q, k, v) and against each other, then times
forward+backward: warm-up, then ``--reps`` interleaved rounds (all sides once
per round, order rotated, a barrier before each step); a round's time is the
slowest rank's; the table shows the median over rounds, and seqpar/peer is the
median (min-max) of the per-round ratios, robust to a machine whose load drifts.  Bytes are what one
rank sends in one forward+backward: seqpar's from ``seqpar.stats.track()``,
the peers' counted by wrapping the collectives they call, with the same
convention (all-gather: (N-1) x input; all-to-all: (N-1)/N x input; ring step
or permute: the whole buffer).

Peers are optional: each is imported inside the worker and skipped with a
message when missing (``pip install deepspeed`` with ``DS_BUILD_OPS=0``).

Example::

    python benchmarks/peers.py --nproc 2 4 --seq-lens 512 1024 2048 4096 --reps 7

``--overhead`` measures instead the host overhead per call at tiny shapes, every seqpar strategy
beside both peers (``benchmarks/overhead.py``).

DeepSpeed notes: ``deepspeed.init_distributed`` is not called (on CPU it JIT-compiles a
shared-memory op); a ``TorchBackend`` adopting the pool's gloo world is installed as
``deepspeed.comm``'s backend instead, and a minimal Megatron-style ``mpu`` (SP group = world) is
registered with ``deepspeed.utils.groups``, without which DeepSpeed's uneven-head all-to-all
(kv heads not divisible by N) believes every rank is SP rank 0 and hangs.  DeepSpeed asserts
kv heads >= N: 8/2 heads at N=4 is reported as a failure of that side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PEERS = {"ulysses": ("deepspeed",), "ring": ("torch_ring", "torch_ring_a2a", "torch_ring_repkv")}
LAYOUT = {"ulysses": "contiguous", "ring": "zigzag"}

# --------------------------------------------------------------------------- worker side


def _inputs(b, s, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
    return [torch.randn(*sh, generator=g).to(dtype) for sh in shapes]


_REF: dict = {}


def _reference(cfg):
    """Single-device SDPA on the whole sequence (BSHD out and grads), cached per rank process."""
    key = (cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"], cfg["causal"])
    if key not in _REF:
        _REF.clear()
        q, k, v, do = _inputs(*key[:5], DTYPES[cfg["dtype"]])
        qs, ks, vs = (t.transpose(1, 2).double().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=cfg["causal"], enable_gqa=True)
        grads = torch.autograd.grad(o, (qs, ks, vs), do.transpose(1, 2).double())
        _REF[key] = [t.transpose(1, 2).detach() for t in (o, *grads)]  # float64, BSHD
    return _REF[key]


class _Bytes:
    """Counter the peers' wrapped collectives add to while ``on``."""

    def __init__(self):
        self.on, self.n = False, 0

    def add(self, nbytes):
        if self.on:
            self.n += int(nbytes)


# ---- DeepSpeed ----------------------------------------------------------------

_DS: dict = {}


def _deepspeed(group):
    """DistributedAttention class and a byte counter; deepspeed.comm wired to the pool's gloo world.

    ``deepspeed.init_distributed`` is avoided: on CPU its TorchBackend JIT-compiles a shared-memory
    op.  A TorchBackend is built with that op disabled (it then adopts the existing process group)
    and installed as deepspeed.comm's backend.
    """
    if "cls" not in _DS:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="seqpar-peers-ext-"))
        import importlib

        dscomm = importlib.import_module("deepspeed.comm.comm")
        dstorch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would bind the torch module
        from deepspeed.sequence.layer import DistributedAttention

        if dscomm.cdb is None:
            build, dstorch.build_shm_op = dstorch.build_shm_op, (lambda: None)
            try:
                dscomm.cdb = dstorch.TorchBackend("gloo", timedelta(minutes=5), None)
            finally:
                dstorch.build_shm_op = build
        counter, a2a = _Bytes(), dscomm.cdb.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            n, r = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
            own = (input.numel() // n if input_split_sizes is None
                   else input_split_sizes[r] * (input.numel() // max(input.shape[0], 1)))
            counter.add((input.numel() - own) * input.element_size())  # what leaves this rank
            return a2a(output=output, input=input, output_split_sizes=output_split_sizes,
                       input_split_sizes=input_split_sizes, group=group, async_op=async_op)

        dscomm.cdb.all_to_all_single = counted
        from deepspeed.utils import groups

        if groups.mpu is None and groups.mesh_device is None:
            # uneven head counts ask deepspeed.utils.groups for this rank's SP rank; with no mpu/mesh
            # registered it answers 0 on every rank and the uneven all-to-all hangs
            groups.mpu = _SPGroups(group)
        _DS.update(cls=DistributedAttention, counter=counter)
    return _DS["cls"], _DS["counter"]


class _SPGroups:
    """The minimal Megatron-style ``mpu`` DeepSpeed's sequence layer consults: the SP group is the world."""

    def __init__(self, group):
        self.group = group

    def get_sequence_parallel_group(self):
        return self.group

    def get_sequence_parallel_rank(self):
        return torch.distributed.get_rank(self.group)

    def get_sequence_parallel_world_size(self):
        return torch.distributed.get_world_size(self.group)


def _sdpa_bshd(q, k, v, causal):
    """DeepSpeed's local attention: [B, S, h, D] head shards -> SDPA (BHSD) -> [B, S, h, D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal, enable_gqa=True)
    return o.transpose(1, 2)


class _LocalSDPA(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return _sdpa_bshd(q, k, v, self.causal)


# ---- PyTorch ring core -----------------------------------------------------------

_TORCH: dict = {}


def _torch_ring():
    """PyTorch's private ring core plus a byte counter on the functional collectives it calls."""
    if "mod" not in _TORCH:
        import torch.distributed._functional_collectives as ft_c
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        counter = _Bytes()
        ag, perm = ft_c.all_gather_single, ft_c.permute_tensor

        def all_gather_single(x, gather_dim, group, *a, **kw):
            counter.add(x.numel() * x.element_size() * (torch.distributed.get_world_size(group) - 1))
            return ag(x, gather_dim, group, *a, **kw)

        def permute_tensor(x, dsts, group, *a, **kw):
            counter.add(x.numel() * x.element_size())
            return perm(x, dsts, group, *a, **kw)

        ft_c.all_gather_single, ft_c.permute_tensor = all_gather_single, permute_tensor  # rank-local patch
        _TORCH.update(mod=cp, counter=counter)
    return _TORCH["mod"], _TORCH["counter"]


class _TorchRingAttention(torch.autograd.Function):
    """``_templated_ring_attention`` forward/backward with the CPU flash ops, on BHSD shards."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, rotate, scale):
        cp, _ = _torch_ring()
        cp._cp_options.enable_load_balance = causal  # head-tail balance; non-causal rejects it
        cp.set_rotate_method(rotate)
        out, lse = cp._templated_ring_attention(
            group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v,
            is_causal=causal, dropout_p=0.0, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, rotate, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        cp, _ = _torch_ring()
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, rotate, scale = ctx.args
        cp._cp_options.enable_load_balance = causal
        cp.set_rotate_method(rotate)
        dq, dk, dv = cp._templated_ring_attention_backward(
            group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            grad_out=dout.contiguous(), grad_out_name="grad_out", query=q, key=k, value=v, out=out,
            logsumexp=lse, is_causal=causal, dropout_p=0.0, scale=scale)[:3]
        return dq, dk, dv, None, None, None, None


# ---- the task ----------------------------------------------------------------------


def _sides(cfg, group, shards):
    """name -> (inputs, step(inputs) -> out in BSHD, bytes counter or None); or name -> 'skip: why'."""
    import seqpar

    causal, layout, pair = cfg["causal"], LAYOUT[cfg["pair"]], cfg["pair"]
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q, k, v = shards
    sides = {}

    extra = {"ring_transport": cfg["ring_transport"]} if pair == "ring" else {}

    def seqpar_step(t):
        return seqpar.attention(*t, causal=causal, strategy=pair, layout=layout, group=group, **extra)

    sides["seqpar"] = ((q, k, v), seqpar_step, None)
    for peer in cfg["peers"]:
        if peer == "deepspeed":
            try:
                cls, counter = _deepspeed(group)
            except ImportError as exc:
                sides[peer] = f"skip: deepspeed not importable ({exc})"
                continue
            attn = cls(_LocalSDPA(causal), group, scatter_idx=2, gather_idx=1)
            sides[peer] = ((q, k, v), lambda t, attn=attn: attn(*t, batch_dim_idx=0), counter)
        else:
            try:
                _, counter = _torch_ring()
            except ImportError as exc:
                sides[peer] = f"skip: torch context-parallel ring core not importable ({exc})"
                continue
            if peer == "torch_ring_repkv" and hkv == h:
                continue  # same as torch_ring
            rotate = "alltoall" if peer == "torch_ring_a2a" else "allgather"
            rep = h // hkv if peer == "torch_ring_repkv" else 1
            bhsd = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))

            def torch_step(t, rotate=rotate, rep=rep):
                tq, tk, tv = t
                if rep > 1:
                    tk, tv = tk.repeat_interleave(rep, dim=1), tv.repeat_interleave(rep, dim=1)
                o = _TorchRingAttention.apply(tq, tk, tv, group, causal, rotate, d ** -0.5)
                return o.transpose(1, 2)

            sides[peer] = (bhsd, torch_step, counter)
    return sides


def _bshd_grads(name, grads):
    return [g.transpose(1, 2) if name.startswith("torch") else g for g in grads]


def bench_pair(cfg: dict):
    """Worker task: check and time seqpar and its peers on one configuration; per-rank results."""
    import torch.distributed as dist

    import seqpar
    from seqpar.core.layout import get_layout

    group = dist.group.WORLD
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = DTYPES[cfg["dtype"]]
    q, k, v, do = _inputs(cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], dtype)
    idx = get_layout(LAYOUT[cfg["pair"]]).indices(cfg["seq_len"], n, rank)
    shards = [t[:, idx].contiguous() for t in (q, k, v)]
    do_l = do[:, idx].contiguous()
    sides = _sides(cfg, group, shards)
    res = {"skips": {s: why for s, why in sides.items() if isinstance(why, str)}, "err": {}, "diff": {},
           "times": {}, "bytes": {}}
    live = {s: v_ for s, v_ in sides.items() if not isinstance(v_, str)}

    def run_once(name):
        inputs, step, _ = live[name]
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = step(leaves)
        grads = torch.autograd.grad(out, leaves, do_l)
        return out.detach(), _bshd_grads(name, grads)

    # correctness: every side against SDPA on the whole sequence, and each peer against seqpar
    results = {}
    for name in list(live):
        try:
            results[name] = run_once(name)
        except Exception as exc:  # raised on every rank alike (argument checks): report, drop the side
            res["skips"][name] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            del live[name]
            dist.barrier()
    if cfg["check"]:
        ref = [t[:, idx] for t in _reference(cfg)]
        for name, (out, grads) in results.items():
            res["err"][name] = [float((a.double() - b).abs().max()) for a, b in zip([out, *grads], ref)]
            if name != "seqpar" and "seqpar" in results:
                mine = [results["seqpar"][0], *results["seqpar"][1]]
                res["diff"][name] = [float((a.double() - b.double()).abs().max()) for a, b in zip([out, *grads], mine)]
    del results

    # bytes sent by this rank in one forward+backward
    for name in live:
        counter = live[name][2]
        if counter is None:
            with seqpar.stats.track() as st:
                run_once(name)
            res["bytes"][name] = sum(st.bytes.values())
        else:
            counter.n, counter.on = 0, True
            try:
                run_once(name)
            finally:
                counter.on = False
            res["bytes"][name] = counter.n

    # timing: warm-up, then interleaved rounds with a rotating order
    names = list(live)
    steps = {}
    for name in names:
        inputs, step, _ = live[name]
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        steps[name] = (lambda leaves=leaves, step=step: torch.autograd.grad(step(leaves), leaves, do_l))
    for _ in range(cfg["warmup"]):
        for name in names:
            dist.barrier()
            steps[name]()
    res["times"] = {name: [] for name in names}
    for r_ in range(cfg["reps"]):
        order = names[r_ % len(names):] + names[:r_ % len(names)]
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            steps[name]()
            res["times"][name].append(time.perf_counter() - t0)
    dist.barrier()
    return res


# --------------------------------------------------------------------------- parent side


def _fmt_err(errs):
    return "/".join(f"{e:.0e}" for e in errs)


HEADER = ("| N | pair | mask | H/Hkv | S | peer | seqpar ms | peer ms | seqpar/peer (range) | seqpar MB sent/rank | "
          "peer MB sent/rank | max err seqpar vs SDPA (o/dq/dk/dv) | max err peer vs SDPA | "
          "max diff peer vs seqpar | agree |\n" + "|---" * 15 + "|")


def _rows(n, cfg, res, tol):
    """Table rows (sort key, text) for one configuration's per-rank results."""
    reps = cfg["reps"]
    rounds = {name: [max(r["times"][name][i] for r in res) for i in range(reps)] for name in res[0]["times"]}
    times = {name: statistics.median(ts) for name, ts in rounds.items()}
    err = {name: [max(r["err"][name][j] for r in res) for j in range(4)] for name in res[0]["err"]}
    diff = {name: [max(r["diff"][name][j] for r in res) for j in range(4)] for name in res[0]["diff"]}
    byt = {name: max(r["bytes"][name] for r in res) for name in res[0]["bytes"]}
    mask = "causal" if cfg["causal"] else "full"
    hs = f"{cfg['heads']}/{cfg['kv_heads']}"
    rows = []
    for peer in cfg["peers"]:
        if peer not in times or "seqpar" not in times:
            continue
        ratios = sorted(a / b for a, b in zip(rounds["seqpar"], rounds[peer]))  # paired: same round
        text = (f"| {n} | {cfg['pair']} | {mask} | {hs} | {cfg['seq_len']} | {peer} | {times['seqpar'] * 1e3:.1f} | "
                f"{times[peer] * 1e3:.1f} | **{statistics.median(ratios):.2f}** "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{byt['seqpar'] / 2**20:.2f} | {byt[peer] / 2**20:.2f} | ")
        if cfg["check"]:
            ok = all(e < tol for e in err[peer] + err["seqpar"] + diff[peer])
            text += (f"{_fmt_err(err['seqpar'])} | {_fmt_err(err[peer])} | {_fmt_err(diff[peer])} | "
                     f"{'yes' if ok else 'NO'} |")
        else:
            text += "- | - | - | - |"
        key = (list(PEERS).index(cfg["pair"]), n, mask, -cfg["kv_heads"], cfg["seq_len"], peer)
        rows.append((key, text))
    return rows


def main() -> None:
    if "--overhead" in sys.argv[1:]:  # host overhead per call at tiny shapes: benchmarks/overhead.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import overhead

        overhead.main([a for a in sys.argv[1:] if a != "--overhead"])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--pairs", nargs="+", default=list(PEERS), choices=tuple(PEERS))
    p.add_argument("--peers", nargs="+", default=None,
                   help="peer sides to run (default all): " + ", ".join(x for v in PEERS.values() for x in v))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--heads", type=str, nargs="+", default=["8/8", "8/2"], help="q/kv head counts, e.g. 8/2")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--mask", nargs="+", default=["full", "causal"], choices=("full", "causal"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--ring-transport", default="auto", choices=("auto", "p2p", "alltoall"),
                   help="seqpar ring's ring_transport (auto = p2p for CPU tensors)")
    ns = p.parse_args()

    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks import this file as a module
    import peers as this
    from seqpar.launch.pool import WorkerPool

    tol = 1e-4 if ns.dtype == "float32" else 5e-2
    print(f"# seqpar vs peers: fwd+bwd on CPU (gloo), {ns.dtype}, B={ns.batch} D={ns.head_dim}, "
          f"seqpar ring_transport={ns.ring_transport}, "
          f"{ns.threads} thread(s)/rank; ms = median over {ns.reps} interleaved rounds of the slowest rank; "
          f"seqpar/peer = median (min-max) of the per-round ratios; agree = every max error below {tol:g}")
    print("# command: python benchmarks/peers.py " + " ".join(sys.argv[1:]), flush=True)
    rows, notes = [], []
    configs = [(mask, hs, s, pair) for mask in ns.mask for hs in ns.heads for s in ns.seq_lens for pair in ns.pairs]
    for n in ns.nproc:
        with WorkerPool(n, threads_per_rank=ns.threads, timeout=600) as pool:
            for mask, hs, s, pair in configs:  # pairs innermost: both reuse the rank's cached SDPA reference
                h, hkv = map(int, hs.split("/"))
                cfg = dict(pair=pair, peers=[x for x in PEERS[pair] if ns.peers is None or x in ns.peers],
                           seq_len=s, heads=h, kv_heads=hkv, head_dim=ns.head_dim, batch=ns.batch,
                           dtype=ns.dtype, causal=mask == "causal", reps=ns.reps, warmup=ns.warmup,
                           check=ns.check, ring_transport=ns.ring_transport)
                t0 = time.time()
                res = pool.run(this.bench_pair, cfg)
                for side, why in res[0]["skips"].items():
                    note = f"N={n} {pair} {mask} H/Hkv={hs}: {side}: {why}"
                    if note not in notes:
                        notes.append(note)
                        print("# " + note, flush=True)
                new = _rows(n, cfg, res, tol)
                rows += new
                for _, text in new:
                    print(text, flush=True)
                print(f"  [N={n} {pair} {mask} H/Hkv={hs} S={s}: {time.time() - t0:.1f} s]", file=sys.stderr,
                      flush=True)
    print("\n" + HEADER)
    for _, text in sorted(rows):
        print(text)
    for note in notes:
        print(f"\n- {note}", end="")
    print()


if __name__ == "__main__":
    main()
