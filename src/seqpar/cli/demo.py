"""``seqpar demo``: what sequence parallelism is for, in under three minutes on a laptop CPU.

A Llama-style model learns a task that needs the whole sequence: needle retrieval.  In 4096-token
sequences of random filler, a needle (128 copies of one token the filler never uses, one of 8 values)
lies at a random depth of the first half; 64 questions scattered over the second half ask for it, each
labelled with a copy of the needle, most of them on another rank's shard than the needle.  The demo

1. checks exactness as users can trust it: the first step's loss and gradients in float64, the
   sequence-parallel layout against one process (relative difference ~1e-12 and below);
2. measures what each rank saves for backward (activations, and attention's share of them, with a
   saved-tensor hook: not the process RSS) beside one process;
3. trains on ``--nproc`` local ranks (gloo), then the same run on one process, overlays the float32
   loss curves (they part only by float32 rounding, amplified by training) and prints the accuracy on
   held-out sequences (the needle is found: 0.9 and above at the defaults);
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

#: attention heads of the demo's model: one (of head_dim = --hidden) learns the task as reliably as two at half
#: the cost, attention's S^2 work dominating a step; strategy ulysses pads the heads to a multiple of its degree
HEADS, KV_HEADS = 1, 1

_MESHES: dict = {}


def _vocab(ns: argparse.Namespace) -> int:
    """Filler, question tokens, needles (key x value); padded to a multiple of 8 and of --tp (which splits
    the vocabulary), the same for both runs."""
    used, pad = ns.filler + ns.keys + ns.keys * ns.values, math.lcm(8, max(1, ns.tp))
    return -(-used // pad) * pad


def _config(ns: argparse.Namespace, single: bool, dtype: str | None = None) -> dict:
    return {"model": {"hidden_size": ns.hidden, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                      "num_hidden_layers": ns.layers, "intermediate_size": 2 * ns.hidden, "vocab_size": _vocab(ns),
                      # untied: tied, the needles' embeddings are drawn toward the question token's own (the
                      # residual at a question), and attention locks onto earlier questions for some values
                      "rope_theta": 1e6, "tie_word_embeddings": False},
            "strategy": "ring" if single else ns.strategy, "tp": 1 if single else ns.tp,
            "ulysses": 1 if single else ns.ulysses, "seq_len": ns.seq_len, "micro_batch": ns.micro_batch,
            "steps": ns.steps, "lr": ns.lr, "warmup": min(ns.warmup, ns.steps),
            "data": {"kind": "needle", "pairs": ns.pairs, "keys": ns.keys, "values": ns.values, "filler": ns.filler,
                     "questions": ns.questions, "repeat": ns.repeat},
            "device": ns.device, "dtype": dtype or ns.dtype, "eval_batches": ns.eval_batches,
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
    far, other = _how_far(ns, sp)
    print(f"seqpar demo: needle retrieval across {ns.seq_len}-token sequences of random filler. In the first half "
          f"{_needles(ns)} at a random depth; {ns.questions} questions at random positions of the second half, each "
          f"labelled with a copy of its needle: on average {far:.0f} tokens after it, {other:.0%} of them on another "
          f"rank's shard than all of their needle. Llama-style model ({_plural(ns.layers, 'layer')}, hidden "
          f"{ns.hidden}, {_plural(HEADS, 'head')}), {ns.steps} AdamW steps of {ns.micro_batch} sequences at lr "
          f"{ns.lr:g}; chance accuracy {1 / ns.values:.3f}.")
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


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _needles(ns) -> str:
    what = (f"one needle ({ns.repeat} copies of one of {ns.values} tokens the filler never uses)" if ns.pairs == 1
            else f"{ns.pairs} needles ({ns.repeat} copies each of one of {ns.values} tokens of its key, of {ns.keys} "
                 f"keys; tokens the filler never uses)")
    return what + (" lies" if ns.pairs == 1 else " lie")


def _how_far(ns, sp: int) -> tuple[float, float]:
    """Over the first batch: the mean distance from a question back to the end of its needle, and the share of
    questions on an sp rank (zigzag) that holds none of their needle's tokens."""
    import torch

    from ..train.data import make_data
    from ..train.loss import IGNORE

    ids, labels = make_data(_config(ns, False)["data"], _vocab(ns), ns.seq_len, ns.seed).batch(0, ns.micro_batch)
    chunk = -(-ns.seq_len // (2 * sp))
    c = torch.arange(ns.seq_len) // chunk
    owner = torch.where(c < sp, c, 2 * sp - 1 - c)  # zigzag: rank r holds chunks r and 2 sp - 1 - r
    dist, apart = [], []
    for b, q in (labels != IGNORE).nonzero().tolist():
        needle = (ids[b] == labels[b, q]).nonzero().flatten()
        needle = needle[needle < q]
        dist.append(q - int(needle.max()))
        apart.append(bool((owner[needle] != owner[q]).all()))
    return sum(dist) / len(dist), sum(apart) / len(apart)


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
    verdict = "found" if par.accuracy >= 0.9 else "not yet found (more --steps)"
    held_out = ns.eval_batches * ns.micro_batch
    print(f"accuracy {par.accuracy:.3f} on the {held_out * ns.questions} questions of {held_out} held-out sequences "
          f"(never trained on; chance {1 / ns.values:.3f}): the needle is {verdict}, with each rank holding "
          f"{ns.seq_len // sp} of the {ns.seq_len} tokens")


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
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--pairs", type=int, default=1, help="needles per sequence, each of its own key")
    p.add_argument("--keys", type=int, default=1, help="distinct keys (question tokens)")
    p.add_argument("--values", type=int, default=8, help="values of each key's needle (chance accuracy is 1/values)")
    p.add_argument("--filler", type=int, default=16, help="distinct filler tokens of the haystack")
    p.add_argument("--repeat", type=int, default=128, help="tokens of each needle (copies of its token in a row)")
    p.add_argument("--questions", type=int, default=64, help="questions in the second half of each sequence")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=5, help="steps of linear warm-up (then cosine decay)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches of --micro-batch sequences for "
                                                              "the accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="of the training runs")
    p.add_argument("--plot", default="seqpar-demo.png", help="where the plot goes (with matplotlib)")
    p.add_argument("--no-reference", action="store_true", help="skip the one-process training run")
    p.set_defaults(func=demo)
