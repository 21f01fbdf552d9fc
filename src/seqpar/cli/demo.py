"""``seqpar demo``: what sequence parallelism is for, in about three minutes on a laptop CPU.

A Llama-style model learns a task that needs the whole sequence: facts (a key and its value) are
planted at random depths of 4096-token sequences and questioned at the very end, so the answer of
most questions lies on another rank's shard.  The demo

1. checks exactness as users can trust it: the first step's loss and gradients in float64, the
   sequence-parallel layout against one process (relative difference ~1e-12 and below);
2. measures what each rank saves for backward (activations, and attention's share of them, with a
   saved-tensor hook: not the process RSS) beside one process;
3. trains on ``--nproc`` local ranks (gloo), then the same run on one process, and overlays the
   float32 loss curves (they part only by float32 rounding, amplified by training);
4. draws loss, memory and time per step (``pip install 'seqpar[plot]'``), else prints a table.
"""
from __future__ import annotations

import argparse
import math
import time

from ..core.errors import ConfigError, SeqParError
from ..core.strategies import SP_STRATEGIES
from .progress import Progress, fail

__all__ = ["add_parser", "demo_worker", "probe_worker"]

#: steps over which the float32 runs agree to rounding (~1e-6); past them training amplifies the
#: rounding of sums taken in another order (ring merge, all-reduce), as between any two such runs
EXACT_STEPS = 10

_MESHES: dict = {}


def _config(ns: argparse.Namespace, single: bool, dtype: str | None = None) -> dict:
    keys, values = ns.keys, ns.values
    heads = 4
    return {"model": {"hidden_size": ns.hidden, "num_attention_heads": heads, "num_key_value_heads": 2,
                      "num_hidden_layers": 2, "intermediate_size": 2 * ns.hidden,
                      "vocab_size": 2 + keys + values + keys * values, "rope_theta": 1e6,
                      "tie_word_embeddings": True},  # the answer is a copy of the planted token
            "strategy": "ring" if single else ns.strategy, "tp": 1 if single else ns.tp,
            "ulysses": 1 if single else ns.ulysses, "seq_len": ns.seq_len, "micro_batch": ns.micro_batch,
            "steps": ns.steps, "lr": ns.lr, "warmup": min(10, ns.steps),
            "data": {"kind": "lookup", "pairs": ns.pairs, "keys": keys, "values": values, "repeat": ns.repeat,
                     "questions": ns.questions, "answer": "fact"},
            "device": ns.device, "dtype": dtype or ns.dtype, "eval_batches": 4,
            "log_every": max(1, ns.steps // 20), "seed": ns.seed}


def _validate(ns: argparse.Namespace) -> None:
    """Every mistake named with its fix before any process starts."""
    from ..train.trainer import TrainConfig

    n, tp, u = ns.nproc, ns.tp, ns.ulysses
    if n < 1 or n % (tp * u):
        raise ConfigError(f"--nproc {n} is not divisible by --tp {tp} x --ulysses {u}: choose degrees whose "
                          f"product divides {n}")
    if ns.strategy == "usp" and not 1 < u < n // tp:
        raise ConfigError(f"--strategy usp needs 1 < --ulysses < {n // tp} (sp ranks): e.g. --ulysses 2")
    if ns.steps < 1:
        raise ConfigError(f"--steps {ns.steps} must be >= 1")
    TrainConfig.from_dict(_config(ns, False))  # sizes, the task's keys/values/pairs, the device


def demo_worker(cfg_dict: dict, progress: bool) -> tuple:
    """Worker task: one rank of the training run; returns (result, per-step [loss, seconds] on rank 0)."""
    from ..train.trainer import TrainConfig, train

    bar = Progress(cfg_dict["steps"], "train (sp)") if progress and _rank() == 0 else None
    steps: list = []

    def on_step(info: dict) -> None:
        steps.append((info["loss"], info["step_time_s"]))
        if bar:
            bar.step(info)

    try:
        result = train(TrainConfig.from_dict(cfg_dict), log=_log_without_rss(bar, cfg_dict), on_step=on_step)
    finally:
        if bar:
            bar.close()
    return result, steps


def _log_without_rss(bar: Progress | None, cfg: dict):
    """The bar's log callback; on CPU without the trainer's peak memory, the process RSS (the demo
    shows measured activation memory instead)."""
    if bar is None:
        return None
    if cfg["device"] == "cuda":
        return bar.line
    return lambda info: bar.line({k: v for k, v in info.items() if k != "peak_mem_mb"})


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def probe_worker(cfg: dict, want_grads: bool) -> dict:
    """One forward/backward of the first batch, without an optimizer, through the public API only.

    Returns the loss, the bytes this rank saves for backward (``act``) and attention's share of them
    (``attn``), and on rank 0 the single-device gradients (gathered over tp) when ``want_grads``.
    """
    import torch
    import torch.distributed as dist

    import seqpar
    from seqpar.core.stats import saved_activations
    from seqpar.models import LlamaForCausalLM
    from seqpar.train import IGNORE, causal_lm_loss, sync_gradients
    from seqpar.train.data import make_data
    from seqpar.train.trainer import DTYPES

    if dist.is_initialized():
        key = (cfg["tp"], cfg["ulysses"])
        if key not in _MESHES:  # groups are built collectively, once per layout in this process
            _MESHES[key] = seqpar.init(tp=cfg["tp"], ulysses=cfg["ulysses"])
        mesh = _MESHES[key]
    else:
        mesh = seqpar.Mesh()
    model = LlamaForCausalLM(cfg["model"], mesh=mesh, strategy=cfg["strategy"], layout="zigzag",
                             dtype=DTYPES[cfg["dtype"]])
    model.init_weights(cfg["seed"])
    data = make_data(cfg["data"], model.config.vocab_size, cfg["seq_len"], cfg["seed"])
    ids, labels = data.batch(0, cfg["micro_batch"])
    ids = seqpar.shard(ids, 1, layout="zigzag", mesh=mesh)
    labels = seqpar.shard(labels, 1, layout="zigzag", mesh=mesh, pad_value=IGNORE)
    attn_bytes = []

    def attend(q, k, v):  # the model's own attention call, its saved tensors counted on their own
        with saved_activations() as s:
            out = seqpar.attention(q, k, v, causal=True, strategy=cfg["strategy"], mesh=mesh, layout="zigzag")
        attn_bytes.append(s.bytes)
        return out

    with saved_activations(exclude=list(model.parameters())) as act:  # attention's hook nests inside
        out = causal_lm_loss(model(ids, cache=[attend] * len(model.layers)), labels, mesh)
    out.loss.backward()
    sync_gradients(model, mesh)
    grads = model.full_state_dict(grads=True) if want_grads else None
    return {"loss": float(out.value), "act": act.bytes + sum(attn_bytes), "attn": sum(attn_bytes),
            "grads": grads if _rank() == 0 else None, "dtype": str(torch.get_default_dtype())}


def _rel(a, b) -> float:
    import torch

    if isinstance(a, dict):
        num = math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b))
        den = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
        return num / max(den, 1e-300)
    return abs(a - b) / max(abs(b), 1e-300) if not torch.is_tensor(a) else 0.0


def _exactness(ns, pool) -> tuple[list, dict]:
    """Step 1 and 2: float64 loss/gradients against one process; float32 saved bytes per rank."""
    par64 = pool.run(probe_worker, _config(ns, False, "float64"), True)[0]
    one64 = probe_worker(_config(ns, True, "float64"), True)
    loss_rel, grad_rel = _rel(par64["loss"], one64["loss"]), _rel(par64["grads"], one64["grads"])
    print(f"      loss {par64['loss']:.15f} (one process {one64['loss']:.15f}): relative difference {loss_rel:.1e}")
    print(f"      gradients of all {len(one64['grads'])} weights: relative difference {grad_rel:.1e} "
          f"(norm of the difference / norm of the one-process gradient)")
    par32 = pool.run(probe_worker, _config(ns, False, "float32"), False)
    one32 = probe_worker(_config(ns, True, "float32"), False)
    return [(loss_rel, grad_rel)], {"ranks": [(r["act"], r["attn"]) for r in par32], "one": (one32["act"],
                                                                                            one32["attn"])}


def _memory_table(ns, mem: dict) -> None:
    mib = 2**20
    one_act, one_attn = mem["one"]
    print(f"      {'':<16}{'saved for backward':>20}{'of which attention':>20}")
    print(f"      {'one process':<16}{one_act / mib:>16.1f} MiB{one_attn / mib:>16.1f} MiB")
    for r, (act, attn) in enumerate(mem["ranks"]):
        print(f"      {f'rank {r} of {ns.nproc}':<16}{act / mib:>16.1f} MiB{attn / mib:>16.1f} MiB"
              f"   ({act / max(one_act, 1):.2f} of one process)")


def _train_single(ns) -> tuple:
    from ..train.trainer import TrainConfig, train

    steps: list = []
    bar = Progress(ns.steps, "train (1 process)")

    def on_step(info: dict) -> None:
        steps.append((info["loss"], info["step_time_s"]))
        bar.step(info)

    try:
        result = train(TrainConfig.from_dict(_config(ns, True)), log=_log_without_rss(bar, _config(ns, True)),
                       on_step=on_step)
    finally:
        bar.close()
    return result, steps


def demo(ns: argparse.Namespace) -> int:
    from ..launch.pool import WorkerPool

    try:
        _validate(ns)
    except SeqParError as e:
        return fail("demo", e)
    sp = ns.nproc // ns.tp
    chance = 1 / ns.values
    print(f"seqpar demo: key lookup across {ns.seq_len}-token sequences: {ns.pairs} facts (key -> value, each "
          f"{ns.repeat} tokens) planted at random depths, questioned at the end; most answers lie on other ranks' "
          f"shards. Llama-style model h={ns.hidden}, {ns.steps} AdamW steps of {ns.micro_batch} sequences; "
          f"chance accuracy {chance:.3f}.")
    print(f"{ns.nproc} local ranks on {ns.device} (gloo): strategy={ns.strategy}, sp={sp} (ulysses={ns.ulysses}), "
          f"tp={ns.tp}, layout=zigzag")
    t_all = time.perf_counter()
    with WorkerPool(ns.nproc, timeout=1800) as pool:
        print(f"[1/4] exactness: the first step in float64, {ns.nproc} ranks against one process")
        exact, mem = _exactness(ns, pool)
        print("[2/4] memory each rank saves for backward (float32, measured by a saved-tensor hook)")
        _memory_table(ns, mem)
        print(f"[3/4] training on {ns.nproc} ranks ({ns.dtype})")
        t0 = time.perf_counter()
        par, par_steps = pool.run(demo_worker, _config(ns, False), True)[0]
        t_par = time.perf_counter() - t0
    single, single_steps, t_one = None, None, None
    if not ns.no_reference:
        print("[4/4] the same training on one process")
        t0 = time.perf_counter()
        single, single_steps = _train_single(ns)
        t_one = time.perf_counter() - t0
    print()
    _summary(ns, par, par_steps, t_par, single, single_steps, t_one, exact)
    _plot_or_table(ns, par_steps, single_steps, mem)
    print(f"\nall of it in {time.perf_counter() - t_all:.0f} s")
    loss_rel, grad_rel = exact[0]
    ok = loss_rel < 1e-10 and grad_rel < 1e-10
    return 0 if ok else 1


def _summary(ns, par, par_steps, t_par, single, single_steps, t_one, exact) -> None:
    sp = ns.nproc // ns.tp
    header = f"{'run':<28}{'world':>6}{'final loss':>12}{'accuracy':>10}{'tok/s':>9}{'time':>8}"
    print(header + "\n" + "-" * len(header))
    rows = [(f"{ns.strategy} (sp={sp}, tp={ns.tp})", par, t_par)] + ([("one process", single, t_one)] if single else [])
    for name, r, t in rows:
        print(f"{name:<28}{r.world_size:>6}{r.losses[-1]:>12.4f}{r.accuracy:>10.3f}{r.tokens_per_s:>9.0f}{t:>7.0f}s")
    loss_rel, grad_rel = exact[0]
    print(f"\nexact: in float64 the first step's loss differs from one process by {loss_rel:.1e} and its gradients "
          f"by {grad_rel:.1e} (relative): the same computation, summed in another order")
    if single is not None:
        diffs = [abs(a[0] - b[0]) / max(abs(b[0]), 1e-30) for a, b in zip(par_steps, single_steps)]
        early = min(EXACT_STEPS, len(diffs))
        print(f"float32 loss curves: relative difference {max(diffs[:early]):.1e} over the first {early} steps, "
              f"{max(diffs):.1e} over all {len(diffs)}: float32 rounding (~1e-7 per sum) in a different summation "
              f"order, amplified step by step by training as between any two runs that reduce in another order; "
              f"not a difference in what is computed (float64 above)")
    verdict = "learned" if par.accuracy >= 0.9 else "not yet learned (more --steps)"
    print(f"accuracy {par.accuracy:.3f} on fresh sequences (chance {1 / ns.values:.3f}): the lookup is {verdict}, "
          f"with each rank holding {ns.seq_len // sp} of the {ns.seq_len} tokens")


def _plot_or_table(ns, par_steps, single_steps, mem) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _table(ns, par_steps, single_steps)
        print("\n(for a plot of loss, memory and time per step: pip install 'seqpar[plot]')")
        return
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = range(1, len(par_steps) + 1)
    a.plot(steps, [x[0] for x in par_steps], label=f"{ns.nproc} ranks ({ns.strategy})")
    if single_steps:
        a.plot(steps, [x[0] for x in single_steps], "--", label="one process")
    a.set(xlabel="step", ylabel="loss", title="loss (float32)")
    a.legend()
    names = ["one\nprocess"] + [f"rank {r}" for r in range(len(mem["ranks"]))]
    acts = [mem["one"][0]] + [x[0] for x in mem["ranks"]]
    attn = [mem["one"][1]] + [x[1] for x in mem["ranks"]]
    b.bar(names, [x / 2**20 for x in acts], label="saved for backward")
    b.bar(names, [x / 2**20 for x in attn], label="of which attention")
    b.set(ylabel="MiB", title="activation memory (measured)")
    b.legend()
    c.plot(steps, [x[1] for x in par_steps], label=f"{ns.nproc} ranks")
    if single_steps:
        c.plot(steps, [x[1] for x in single_steps], "--", label="one process")
    c.set(xlabel="step", ylabel="seconds", title="time per step")
    c.legend()
    fig.tight_layout()
    fig.savefig(ns.plot, dpi=100)
    print(f"\nplot: {ns.plot} (loss, memory, time per step)")


def _table(ns, par_steps, single_steps) -> None:
    print(f"\n{'step':>6}{'loss ' + str(ns.nproc) + ' ranks':>16}{'loss 1 process':>16}{'s/step ranks':>14}"
          f"{'s/step 1 proc':>14}")
    every = max(1, len(par_steps) // 10)
    for i in list(range(0, len(par_steps), every)) + ([len(par_steps) - 1] if (len(par_steps) - 1) % every else []):
        one = single_steps[i] if single_steps else (float("nan"), float("nan"))
        print(f"{i + 1:>6}{par_steps[i][0]:>16.4f}{one[0]:>16.4f}{par_steps[i][1]:>14.2f}{one[1]:>14.2f}")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train sequence-parallel on local ranks a task that needs the whole sequence, "
                                    "checked against one process", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  seqpar demo\n  seqpar demo --strategy usp --ulysses 2\n"
                              "  seqpar demo --nproc 2 --seq-len 1024 --steps 20")
    p.add_argument("--nproc", type=int, default=4, help="local ranks (default 4)")
    p.add_argument("--strategy", default="ring", choices=SP_STRATEGIES)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (Megatron TP + SP)")
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per step")
    p.add_argument("--pairs", type=int, default=1, help="facts planted per sequence")
    p.add_argument("--keys", type=int, default=1, help="distinct keys")
    p.add_argument("--values", type=int, default=16, help="distinct values (chance accuracy is 1/values)")
    p.add_argument("--repeat", type=int, default=512, help="tokens of each fact (a needle of this length)")
    p.add_argument("--questions", type=int, default=8, help="questions at the end of each sequence")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="of the training runs")
    p.add_argument("--plot", default="seqpar-demo.png", help="where the plot goes (with matplotlib)")
    p.add_argument("--no-reference", action="store_true", help="skip the one-process training run")
    p.set_defaults(func=demo)
