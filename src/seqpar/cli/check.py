"""``seqpar check``: is every strategy exact on *your* attention shapes?

Runs each strategy the planner considers (ring, ulysses, allgather, usp,
ring_qk_av) on the given shapes, forward and backward, and reports the largest
error of the output, the log-sum-exp (``return_lse=True``) and dq, dk, dv
against a float64 single-device reference computed from the same (dtype-rounded)
inputs, then the same error against world size. Exit status 1 if any error
exceeds the dtype's tolerance (four times what single-device PyTorch SDPA gets wrong
in that dtype, and at least ``floor x max(1, |reference|)``), 2 on bad input.

Where it runs: under ``torchrun`` (``WORLD_SIZE`` set) in-process on the current
world; otherwise on ``--nproc`` local ranks (gloo) at world sizes 1, 2, 4, ... up
to ``--nproc``. Packed documents (``--cu-seqlens``) are sharded with
``seqpar.shard(..., cu_seqlens=...)``; a length the layout cannot split evenly is
padded (``return_info=True``), as a user would.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, SeqParError
from ..core.strategies import SP_STRATEGIES as STRATEGIES
from .progress import Progress, fail

__all__ = ["add_parser", "plan_cases", "run_case", "reference", "tolerance", "validate"]

KEYS = ("out", "lse", "dq", "dk", "dv")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: smallest tolerance, relative to max(1, |reference|): what the dtype can represent after a few roundings
FLOOR = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}

_MESHES: dict = {}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _kv_ok(kv: int, u: int) -> bool:
    return kv % u == 0 or u % kv == 0


def validate(ns: argparse.Namespace, world: int) -> None:
    """Every user error, named with its fix, before any process starts."""
    h, kv = ns.heads, ns.kv_heads
    for name in ("heads", "kv_heads", "head_dim", "batch", "nproc"):
        if getattr(ns, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(ns, name)}")
    if h % kv:
        raise ConfigError(f"--heads {h} must be a multiple of --kv-heads {kv} (GQA groups): "
                          f"choose --kv-heads from {', '.join(map(str, _divisors(h)))}")
    if ns.cu_seqlens is not None:
        cu = ns.cu_seqlens
        if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ConfigError(f"--cu-seqlens {' '.join(map(str, cu))} must start at 0 and increase strictly, "
                              f"e.g. --cu-seqlens 0 100 250 {ns.seq_len or 512}")
        if ns.seq_len is not None and cu[-1] != ns.seq_len:
            raise ConfigError(f"--cu-seqlens ends at {cu[-1]} but --seq-len is {ns.seq_len}: "
                              f"end the list at {ns.seq_len} or drop --seq-len")
        ns.seq_len = cu[-1]
    ns.seq_len = 1024 if ns.seq_len is None else ns.seq_len
    if ns.seq_len < 1:
        raise ConfigError(f"--seq-len must be positive, got {ns.seq_len}")
    if ns.window is not None and any(w < -1 for w in ns.window):
        raise ConfigError(f"--window {ns.window[0]} {ns.window[1]}: each side is a token count >= 0, or -1 for "
                          "unbounded (e.g. --window 4095 0)")
    if ns.ulysses is not None:
        u = ns.ulysses
        ok = [x for x in _divisors(world) if 1 < x < world and h % x == 0 and _kv_ok(kv, x)]
        if h % u:
            raise ConfigError(f"--heads {h} is not divisible by --ulysses {u}: choose --ulysses from "
                              f"{', '.join(map(str, ok)) or '(none for this world)'}, or drop it")
        if not _kv_ok(kv, u):
            raise ConfigError(f"--kv-heads {kv} and --ulysses {u} must divide one another")
        if world % u or not 1 < u < world:
            raise ConfigError(f"--ulysses {u} must divide the world ({world} ranks) and lie strictly between 1 and "
                              f"it for usp: choose from {', '.join(map(str, ok)) or '(none)'}")
    if getattr(ns, "device", None) == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda but this machine has no CUDA device (torch {torch.__version__}): "
                          f"drop --device (CPU), or run where a GPU and a CUDA build of torch are")
    if ns.seq_len > 16384:
        print(f"note: the float64 reference is O(S^2) per head: S={ns.seq_len} will be slow", file=sys.stderr)


def _usp_degree(ns: argparse.Namespace, world: int) -> tuple[int | None, str]:
    """The ulysses degree usp uses at ``world`` ranks, or None and why not."""
    if ns.ulysses is not None:
        u = ns.ulysses
        return (u, "") if world % u == 0 and 1 < u < world else (None, f"--ulysses {u} needs a world it splits "
                                                                          f"into {u} x (>1) ranks")
    ok = [u for u in _divisors(world) if 1 < u < world and ns.heads % u == 0 and _kv_ok(ns.kv_heads, u)]
    if not ok:
        if not [u for u in _divisors(world) if 1 < u < world]:
            return None, f"no 2-D split of {world} ranks (usp needs 1 < ulysses < world)"
        return None, f"no ulysses degree u (1 < u < {world}, u | {world}) divides heads={ns.heads}/kv={ns.kv_heads}"
    return max(ok), ""


def plan_cases(ns: argparse.Namespace, world: int) -> list[tuple[str, int | None, str]]:
    """``(strategy, ulysses degree or None, skip reason or "")`` for every strategy at ``world`` ranks."""
    out: list[tuple[str, int | None, str]] = []
    for s in ns.strategies:
        too_big = _too_big(s, ns, world)
        if too_big:
            out.append((s, None, too_big))
        elif s == "usp":
            u, why = _usp_degree(ns, world)
            out.append((s, u, why))
        else:
            out.append((s, None, ""))
    return out


def padded_heads(heads: int, kv_heads: int, world: int) -> int | None:
    """The query heads ulysses pads to at ``world`` ranks (when they do not split evenly), else None."""
    if world <= 1 or (heads % world == 0 and _kv_ok(kv_heads, world)):
        return None
    return -(-heads // world) * world


def _memory_budget() -> float:
    """Bytes this machine can still give (``MemAvailable``), or infinity where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _too_big(strategy: str, ns: argparse.Namespace, world: int) -> str:
    """Why ``ring_qk_av`` must be skipped at this size ("" when it fits).

    It materialises each rank's scores ``[B, H, S/N, S]``: about four such tensors (scores, probabilities
    and their gradients) over all ranks, all on this machine when the ranks are local, whatever N is.
    """
    if strategy != "ring_qk_av":
        return ""
    item = 8 if ns.dtype == "float64" else 4  # the scores are float32 at least
    need = 4 * ns.batch * ns.heads * ns.seq_len ** 2 * item
    if "WORLD_SIZE" in os.environ:  # torchrun: each rank has its own device; this rank's share
        need //= max(1, world)
    budget = _memory_budget() / 2
    if need <= budget:
        return ""
    return (f"materialises B*H*S^2 scores ({need / 2**30:.1f} GiB in all), more than half the "
            f"{budget * 2 / 2**30:.1f} GiB available: lower --seq-len or --heads to include it")


def _inputs(spec: dict):
    """The full problem, identical on every rank: q, k, v, dO in float64 from a seeded generator."""
    g = torch.Generator().manual_seed(spec["seed"])
    b, s, h, kv, d = spec["batch"], spec["seq_len"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    return [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in
            ((b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d))]


def run_case(strategy: str, ulysses: int | None, spec: dict) -> dict | None:
    """Rank task: this rank's shards through seqpar.attention; rank 0 returns the unsharded results."""
    import torch.distributed as dist

    import seqpar

    world = dist.get_world_size() if dist.is_initialized() else 1
    key = (world, ulysses or 1)
    if key not in _MESHES:  # building groups is a collective: once per degrees in this process
        _MESHES[key] = seqpar.init(sp=world, ulysses=ulysses or 1)
    mesh = _MESHES[key]
    dt, dev, lay, cu = DTYPES[spec["dtype"]], spec["device"], spec["layout"], spec["cu_seqlens"]
    full = [t.to(device=dev, dtype=dt) for t in _inputs(spec)]
    split = [seqpar.shard(t, 1, layout=lay, mesh=mesh, cu_seqlens=cu, return_info=True) for t in full]
    shards = [x for x, _ in split]
    info = split[-1][1]  # q, k, v and dO have one sequence length: one split
    seq_info = info if cu is None and info.padding else None  # padding a plain sequence must be masked
    q, k, v = (x.detach().requires_grad_() for x in shards[:3])
    out, lse = seqpar.attention(q, k, v, causal=spec["causal"], strategy=strategy, mesh=mesh, layout=lay,
                                cu_seqlens=cu, seq_info=seq_info, window=spec["window"], return_lse=True)
    out.backward(shards[3])
    un = dict(layout=lay, mesh=mesh, cu_seqlens=cu, seq_info=seq_info)
    res = {name: seqpar.unshard(x.detach(), dim, **un).cpu()
           for name, x, dim in (("out", out, 1), ("lse", lse, 2), ("dq", q.grad, 1), ("dk", k.grad, 1),
                                ("dv", v.grad, 1))}
    res["padding"] = info.padding
    return res if (dist.get_rank() if dist.is_initialized() else 0) == 0 else None


def _mask(spec: dict, rows: slice | None = None) -> torch.Tensor | None:
    """``keep[i, j]``: query i (of ``rows``) sees key j (documents, causal, window); None when all is visible."""
    s, cu, win = spec["seq_len"], spec["cu_seqlens"], spec["window"]
    if not spec["causal"] and cu is None and win is None:
        return None
    rows = rows if rows is not None else slice(0, s)
    pos, doc = torch.arange(s), torch.zeros(s, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu or [0, s], (cu or [0, s])[1:])):
        doc[a:b], pos[a:b] = i, torch.arange(b - a)
    rel = pos.unsqueeze(0) - pos[rows].unsqueeze(1)  # key position - query position
    keep = doc.unsqueeze(0) == doc[rows].unsqueeze(1)
    if spec["causal"]:
        keep &= rel <= 0
    if win is not None:
        left, right = win
        keep &= (rel >= -left if left >= 0 else True) & (rel <= right if right >= 0 else True)
    return keep


#: bytes of one block of float64 scores in the reference: memory stays O(S x block), not O(S^2)
REFERENCE_BLOCK_BYTES = 2**26


def reference(spec: dict, dtype: torch.dtype = torch.float64) -> dict:
    """Single-device attention, one head and one block of queries at a time: out, lse, dq, dk, dv.

    float64: dense math, the reference. Another ``dtype``: PyTorch's SDPA in it, the baseline
    the tolerance is scaled from (its lse entry is left unset).  Each query's output depends on
    its own row alone, so streaming the queries in blocks (the keys' and values' gradients summed
    over the blocks) gives the same result as one call, in O(S x block) memory.
    """
    q, k, v, do = (t.to(DTYPES[spec["dtype"]]) for t in _inputs(spec))  # the inputs the strategies saw
    g, (b, s) = spec["heads"] // spec["kv_heads"], q.shape[:2]
    block = max(1, min(s, REFERENCE_BLOCK_BYTES // (8 * b * s)))
    res = {"out": torch.empty(q.shape, dtype=dtype), "dq": torch.empty(q.shape, dtype=dtype),
           "dk": torch.zeros(k.shape, dtype=dtype), "dv": torch.zeros(v.shape, dtype=dtype),
           "lse": torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float64)}
    for h in range(q.shape[2]):
        kh, vh = (t[:, :, h // g].to(dtype, copy=True).requires_grad_() for t in (k, v))
        for a in range(0, s, block):
            rows = slice(a, min(s, a + block))
            qh = q[:, rows, h].to(dtype, copy=True).requires_grad_()
            keep = _mask(spec, rows)
            if dtype == torch.float64:
                sc = qh @ kh.transpose(1, 2) / math.sqrt(q.shape[-1])
                if keep is not None:
                    sc = sc.masked_fill(~keep, float("-inf"))
                res["lse"][:, h, rows] = torch.logsumexp(sc, -1).detach()
                o = torch.softmax(sc, -1) @ vh
            else:
                o = F.scaled_dot_product_attention(qh.unsqueeze(1), kh.unsqueeze(1), vh.unsqueeze(1),
                                                   attn_mask=keep).squeeze(1)
            o.backward(do[:, rows, h].to(dtype))
            res["out"][:, rows, h], res["dq"][:, rows, h] = o.detach(), qh.grad
        res["dk"][:, :, h // g] += kh.grad
        res["dv"][:, :, h // g] += vh.grad
    return res


def tolerance(spec: dict, ref: dict, baseline: dict) -> dict[str, float]:
    """Per quantity: max(4 x single-device SDPA error in the dtype, floor x max(1, |reference|))."""
    tol = {}
    for key in KEYS:
        floor = FLOOR[spec["dtype"]] * max(1.0, ref[key].abs().max().item())
        base = 4 * _err(baseline[key], ref[key]) if key in baseline else 0.0
        tol[key] = max(floor, base)
    return tol


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _run_all(ns, spec, worlds, runner, progress: Progress | None = None) -> tuple[dict, dict, list]:
    """Run every (world, strategy), then compare: (tolerances, errors per (strategy, world), table rows).

    The references come after the runs, so that under torchrun the other ranks do not
    wait in a collective while rank 0 computes them.
    """
    cases = [(world, case) for world in worlds for case in plan_cases(ns, world)]
    total = len(cases) + 2
    runs = []
    for i, (world, (strategy, u, why)) in enumerate(cases):
        if progress is not None:
            progress.line({"step": i, "what": f"{strategy} at world {world}"})
        runs.append((strategy, world, u, None if why else runner(world, run_case, strategy, u, spec)[0], why))
    if progress is not None:
        progress.line({"step": total - 2, "what": "float64 reference on one process"})
    ref = reference(spec)
    if progress is not None:
        progress.line({"step": total - 1, "what": f"{spec['dtype']} SDPA baseline on one process"})
    baseline = reference(spec, dtype=DTYPES[spec["dtype"]])
    if progress is not None:
        progress.step({"step": total, "what": "done"})
        progress.close()
    baseline.pop("lse")  # SDPA gives no lse: its tolerance is the floor alone
    tol = tolerance(spec, ref, baseline)
    errs: dict = {}
    rows: list[tuple] = []
    for strategy, world, u, res, why in runs:
        if res is None:
            rows.append((strategy, world, u, None, why))
            continue
        e = errs[(strategy, world)] = {key: _err(res[key], ref[key]) for key in KEYS}
        rows.append((strategy, world, u, {**e, "padding": res["padding"]}, ""))
    return tol, errs, rows


def count_cases(ns, worlds) -> int:
    """Units of work :func:`_run_all` reports progress over: each case, the reference and the baseline."""
    return sum(len(plan_cases(ns, w)) for w in worlds) + 2


def _report(ns, spec, worlds, tol, errs, rows) -> int:
    top = max(worlds)
    print(f"seqpar check: B={spec['batch']} S={spec['seq_len']} H={spec['heads']} Hkv={spec['kv_heads']} "
          f"D={spec['head_dim']} {spec['dtype']} causal={spec['causal']} layout={spec['layout']}"
          + (f" window={tuple(spec['window'])}" if spec["window"] else "")
          + (f" documents={len(spec['cu_seqlens']) - 1}" if spec["cu_seqlens"] else "")
          + f"; reference: float64 on one device; world sizes {', '.join(map(str, worlds))}\n")
    head = f"{'strategy':<11}{'world':>6}" + "".join(f"{k:>10}" for k in KEYS) + "  result"
    print(head + "\n" + "-" * len(head))
    print(f"{'tolerance':<17}" + "".join(f"{tol[k]:>10.1e}" for k in KEYS))
    failed = []
    for strategy, world, u, e, why in rows:
        if world != top:
            continue
        name = f"usp u={u}" if strategy == "usp" and u else strategy
        if e is None:
            print(f"{name:<11}{world:>6}  skipped: {why}")
            continue
        bad = [k for k in KEYS if e[k] > tol[k]]
        failed += [(strategy, world, k) for k in bad]
        pad = f" (padded {e['padding']})" if e["padding"] else ""
        heads = padded_heads(spec["heads"], spec["kv_heads"], world) if strategy == "ulysses" else None
        pad += f" (heads padded {spec['heads']}->{heads} over {world} ranks)" if heads else ""
        print(f"{name:<11}{world:>6}" + "".join(f"{e[k]:>10.1e}" for k in KEYS) + "  "
              + ("ok" if not bad else "FAIL: " + ", ".join(bad)) + pad)
    notes: list[str] = []
    if len(worlds) > 1:
        print("\nlargest error over out/lse/dq/dk/dv (error / tolerance), by world size:")
        print(f"{'strategy':<11}" + "".join(f"{'world ' + str(w):>20}" for w in worlds))
        for strategy in ns.strategies:
            cells = []
            for w in worlds:
                e = errs.get((strategy, w))
                if e is None:
                    why = next((r[4] for r in rows if r[0] == strategy and r[1] == w), "")
                    if why and why not in notes:
                        notes.append(why)
                    cells.append(f"{'skipped (' + str(notes.index(why) + 1) + ')' if why else 'skipped':>20}")
                    continue
                ratio = max(e[k] / tol[k] for k in KEYS)
                failed += [(strategy, w, k) for k in KEYS if e[k] > tol[k] and w != top]
                cells.append(f"{max(e[k] for k in KEYS):>13.1e} ({ratio:4.2f})")
            print(f"{strategy:<11}" + "".join(cells))
        for i, why in enumerate(notes):
            print(f"  ({i + 1}) skipped: {why}")
    print("\n" + ("all strategies within tolerance" if not failed else
                  f"FAILED: {len(failed)} error(s) above tolerance: "
                  + ", ".join(f"{s}@{w}:{k}" for s, w, k in failed)))
    return 1 if failed else 0


def run(ns: argparse.Namespace) -> int:
    """Entry point of ``seqpar check`` (returns the exit status)."""
    torchrun = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if torchrun else ns.nproc
    try:
        validate(ns, world)
    except SeqParError as e:
        return fail("check", e, quiet=torchrun and int(os.environ.get("RANK", "0")) != 0)
    device = ns.device or ("cuda" if torchrun and torch.cuda.is_available() else "cpu")
    spec = dict(batch=ns.batch, seq_len=ns.seq_len, heads=ns.heads, kv_heads=ns.kv_heads, head_dim=ns.head_dim,
                dtype=ns.dtype, causal=ns.causal, window=list(ns.window) if ns.window else None,
                cu_seqlens=list(ns.cu_seqlens) if ns.cu_seqlens else None, layout=ns.layout, seed=0, device=device)
    if torchrun:
        return _run_torchrun(ns, spec, world)
    worlds = sorted({w for w in (2 ** i for i in range(world.bit_length())) if w <= world} | {world})
    from ..launch.pool import get_pool

    progress = Progress(count_cases(ns, worlds), "check", unit="case", stream=sys.stderr)
    tol, errs, rows = _run_all(ns, spec, worlds, lambda w, fn, *a: get_pool(w).run(fn, *a), progress)
    return _report(ns, spec, worlds, tol, errs, rows)


def _run_torchrun(ns: argparse.Namespace, spec: dict, world: int) -> int:
    """In-process on the torchrun world: every rank runs, rank 0 compares and prints, all share its status."""
    import torch.distributed as dist

    import seqpar

    if spec["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        spec["device"] = f"cuda:{torch.cuda.current_device()}"
    seqpar.init()  # initialises the process group from torchrun's environment
    rank = dist.get_rank()
    if rank == 0:
        progress = Progress(count_cases(ns, [world]), "check", unit="case", stream=sys.stderr)
        tol, errs, rows = _run_all(ns, spec, [world], lambda w, fn, *a: [fn(*a)], progress)
        status = [_report(ns, spec, [world], tol, errs, rows)]
    else:
        for strategy, u, why in plan_cases(ns, world):  # the same calls, in the same order, as rank 0
            if not why:
                run_case(strategy, u, spec)
        status = [0]
    dist.broadcast_object_list(status, src=0)
    return int(status[0])


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="check every attention strategy on your shapes against one device",
                       description=__doc__.split("\n\n")[0],
                       epilog="examples:\n  seqpar check --heads 32 --kv-heads 8 --head-dim 128 --seq-len 4096\n"
                              "  seqpar check --cu-seqlens 0 300 700 1024 --window 255 0 --nproc 4\n"
                              "  torchrun --nproc-per-node 8 -m seqpar.cli check --dtype bfloat16 --seq-len 32768"
                              "  # on GPUs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="local ranks (default 4; ignored under torchrun)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=None, help="tokens (default 1024, or the end of --cu-seqlens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), help="sliding window (-1: unbounded)")
    p.add_argument("--cu-seqlens", type=int, nargs="+", metavar="N", help="packed documents, e.g. 0 300 1000 2048")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ulysses", type=int, help="ulysses degree of usp (default: the largest that fits)")
    p.add_argument("--layout", choices=("zigzag", "contiguous", "stripe"), default="zigzag")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda under torchrun with GPUs, else cpu")
    p.set_defaults(func=run)
