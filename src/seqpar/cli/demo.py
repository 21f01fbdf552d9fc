"""``seqpar demo``: train the reference model sequence-parallel on local ranks, and prove it exact.

Starts ``--nproc`` local ranks (gloo on CPU by default), trains the Llama-style
reference model on associative recall across a long sequence (the key/value
pairs and the queries sit on different shards, so only attention over the
whole sequence can answer), then runs the same training on one process and
prints both: the losses must agree.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..core.errors import SeqParError
from ..core.strategies import SP_STRATEGIES

__all__ = ["add_parser", "demo_worker"]

# steps over which the two runs must agree to rounding; past a few dozen steps of training any two
# runs whose reductions sum in a different order part (chaotic amplification), even in float64
EXACT_STEPS = 10


def _bar(info: dict) -> None:
    done = info["step"] / info["steps"]
    bar = "=" * int(28 * done) + ">" + " " * (28 - int(28 * done))
    mem = info["peak_mem_mb"]
    line = (f"\r  step {info['step']:>4}/{info['steps']} [{bar[:29]}] loss {info['loss']:.3f}  "
            f"{info['tokens_per_s'] / 1e3:.1f}k tok/s  peak mem/rank {min(mem):.0f}-{max(mem):.0f} MB")
    sys.stdout.write(line + ("\n" if info["step"] == info["steps"] else ""))
    sys.stdout.flush()


def demo_worker(cfg_dict: dict, progress: bool):
    """Worker task: one rank of the training run; returns the result."""
    from ..train.trainer import TrainConfig, train

    return train(TrainConfig.from_dict(cfg_dict), log=_bar if progress else None)


def _config(ns: argparse.Namespace, single: bool) -> dict:
    return {"model": {"hidden_size": ns.hidden, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "num_hidden_layers": 2, "intermediate_size": 2 * ns.hidden, "vocab_size": ns.vocab},
            "strategy": "ring" if single else ns.strategy, "tp": 1 if single else ns.tp,
            "ulysses": 1 if single else ns.ulysses, "seq_len": ns.seq_len, "micro_batch": ns.micro_batch,
            "steps": ns.steps, "lr": ns.lr, "data": {"kind": "recall", "pairs": ns.pairs},
            "device": ns.device, "dtype": ns.dtype,
            "log_every": max(1, ns.steps // 50), "seed": ns.seed}


def _validate(ns: argparse.Namespace) -> None:
    """Every mistake named with its fix before any process starts."""
    from ..train.trainer import TrainConfig

    n, tp, u = ns.nproc, ns.tp, ns.ulysses
    if n < 1 or n % (tp * u):
        raise SeqParError(f"--nproc {n} is not divisible by --tp {tp} x --ulysses {u}: choose degrees whose "
                          f"product divides {n}")
    sp = n // tp
    unit = 2 * sp * (tp if tp > 1 else 1)
    if ns.seq_len % unit:
        raise SeqParError(f"--seq-len {ns.seq_len} must be a multiple of {unit} (zigzag over sp={sp} ranks"
                          + (f", then sequence parallel over tp={tp}" if tp > 1 else "") +
                          f"): try --seq-len {(ns.seq_len // unit + 1) * unit}")
    if ns.strategy == "ulysses" and 4 % sp and sp % 4:
        raise SeqParError(f"ulysses over sp={sp} ranks with 4 heads: use --strategy usp --ulysses 2 or ring")
    TrainConfig.from_dict(_config(ns, False))


def demo(ns: argparse.Namespace) -> int:
    from ..launch.pool import WorkerPool
    from ..train.trainer import TrainConfig, train

    try:
        _validate(ns)
    except SeqParError as e:
        print(f"seqpar demo: {e}", file=sys.stderr)
        return 2
    sp = ns.nproc // ns.tp
    print(f"seqpar demo: associative recall over {ns.seq_len} tokens ({ns.pairs} key/value pairs at the start, "
          f"queries at the end), Llama-style model h={ns.hidden}, {ns.steps} AdamW steps")
    print(f"[1/2] {ns.nproc} local ranks on {ns.device} (gloo): strategy={ns.strategy}, sp={sp} "
          f"(ulysses={ns.ulysses}), tp={ns.tp}, layout=zigzag")
    t0 = time.perf_counter()
    with WorkerPool(ns.nproc, timeout=600) as pool:
        par = pool.run(demo_worker, _config(ns, False), True)[0]
    t_par = time.perf_counter() - t0
    print(f"      {t_par:.0f} s")
    single = None
    if not ns.no_reference:
        print("[2/2] the same run on one process")
        t0 = time.perf_counter()
        single = train(TrainConfig.from_dict(_config(ns, True)), log=_bar)
        print(f"      {time.perf_counter() - t0:.0f} s")
    print()
    header = f"{'run':<26}{'world':>6}{'final loss':>12}{'recall acc':>12}{'tok/s':>9}{'peak MB/rank':>14}"
    print(header + "\n" + "-" * len(header))
    rows = [(f"{ns.strategy} (sp={sp}, tp={ns.tp})", par)] + ([("one process", single)] if single else [])
    for name, r in rows:
        print(f"{name:<26}{r.world_size:>6}{r.losses[-1]:>12.4f}{r.accuracy:>12.3f}{r.tokens_per_s:>9.0f}"
              f"{max(r.peak_mem_mb):>14.0f}")
    if single is None:
        return 0
    diffs = [abs(a - b) for a, b in zip(par.losses, single.losses)]
    early = min(EXACT_STEPS, ns.steps)
    tol = (1e-10 if ns.dtype == "float64" else 1e-5) * max(1.0, abs(single.losses[0]))
    ok = max(diffs[:early]) <= tol
    print(f"\nlargest loss difference over the first {early} steps: {max(diffs[:early]):.2e} -> "
          + ("the sequence-parallel run equals one process" if ok else "MISMATCH"))
    if ns.steps > early:
        parted = next((i + 1 for i, d in enumerate(diffs) if d > 1e-3), None)
        print(f"over all {ns.steps} steps: {max(diffs):.2e}" + (
            f" (from step {parted} on: rounding-level differences in summation order, ~1e-7, are amplified by "
            f"training, as between any two runs that reduce in a different order)" if parted else ""))
    chance = 1 / ((ns.vocab - 2) // 2)
    print(f"recall accuracy {par.accuracy:.3f} (chance {chance:.3f}): the answers live on other ranks' shards")
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train the reference model sequence-parallel on local ranks, checked "
                                    "against one process")
    p.add_argument("--nproc", type=int, default=4, help="local ranks (default 4)")
    p.add_argument("--strategy", default="ring", choices=SP_STRATEGIES)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (Megatron TP + SP)")
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4, help="key/value pairs to recall")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=34, help="2 specials + keys + values")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-reference", action="store_true", help="skip the one-process comparison run")
    p.set_defaults(func=demo)
