"""``seqpar plan``: which sequence-parallel layout to use, from the analytic model (no GPU needed).

Takes a registered model (``llama3-8b``, ``llama3-70b``, ``gpt3-175b``...), a Hugging
Face ``config.json`` (``--config``) or explicit sizes (``--hidden --heads --layers
--ffn --vocab``; on top of a model they override it), the sequence length and the
cluster, and prints the recommendation with its one-line reason, then every layout
considered (fitting ones first, fastest first). ``--json`` prints :meth:`Plan.to_dict`
instead; ``--plot FILE.png`` draws memory and step time against sequence length,
one line per scheme (needs matplotlib).

Every argument is checked before planning; a bad one exits with status 2 and a
message that names the fix (``--tp 4 does not divide --gpus 6: ...``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from typing import Any

from ..core.configs import MODELS, ModelConfig, get_config
from ..core.errors import ConfigError, SeqParError
from ..plan.parallel_layout import STRATEGIES as PLAN_STRATEGIES

__all__ = ["add_parser", "build_config", "parse_tokens", "validate"]

_SIZE_FLAGS = {  # flag -> (ModelConfig field, Hugging Face key)
    "hidden": ("hidden_size", "hidden_size"), "heads": ("num_attention_heads", "num_attention_heads"),
    "kv_heads": ("num_key_value_heads", "num_key_value_heads"), "layers": ("num_layers", "num_hidden_layers"),
    "ffn": ("ffn_hidden_size", "intermediate_size"), "vocab": ("vocab_size", "vocab_size"),
    "head_dim": ("head_dim", "head_dim"),
}
_REQUIRED = ("hidden", "heads", "layers", "ffn", "vocab")
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def parse_tokens(text: str) -> int:
    """``131072``, ``128k`` (x1024) or ``1M`` (x1024^2) as an int (argparse type)."""
    t = str(text).strip().lower().replace("_", "")
    mult = {"k": 1024, "m": 1024 ** 2}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 131072, 128k, 1M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return n


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_config(ns: argparse.Namespace) -> ModelConfig:
    """The model from ``ns.model`` / ``ns.config`` / size flags. Raises ConfigError naming the fix."""
    sizes = {k: getattr(ns, k) for k in _SIZE_FLAGS if getattr(ns, k, None) is not None}
    if ns.model and ns.config:
        raise ConfigError("give a model name or --config FILE, not both")
    if ns.config:
        try:
            with open(ns.config) as f:
                mapping = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read --config {ns.config}: {e}") from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"--config {ns.config} must hold a JSON object (a Hugging Face config.json)")
        mapping.update({_SIZE_FLAGS[k][1]: v for k, v in sizes.items()})  # flags win over the file
        try:
            return ModelConfig.from_mapping(mapping, name=str(mapping.get("_name_or_path") or ns.config))
        except ConfigError as e:
            raise ConfigError(f"{ns.config}: {e}; add the key(s) to the file or pass them as flags "
                              f"({', '.join(_flag(k) for k in _REQUIRED)})") from None
    elif ns.model:
        base = get_config(ns.model)  # unknown names: the message lists the known ones
    else:
        missing = [_flag(k) for k in _REQUIRED if k not in sizes]
        if missing:
            raise ConfigError(f"no model: name one ({', '.join(sorted(MODELS))}), give --config CONFIG.json, "
                              f"or give every size; missing {', '.join(missing)}")
        return ModelConfig(**{_SIZE_FLAGS[k][0]: v for k, v in sizes.items()}, name="custom")
    if not sizes:
        return base
    fields = {_SIZE_FLAGS[k][0]: v for k, v in sizes.items()}
    if ("hidden" in sizes or "heads" in sizes) and "head_dim" not in sizes:
        fields["head_dim"] = None  # re-derived as hidden / heads
    if "heads" in sizes and "kv_heads" not in sizes and base.kv_heads == base.num_attention_heads:
        fields["num_key_value_heads"] = None  # plain multi-head stays multi-head
    return dataclasses.replace(base, name=base.name + " (modified)", **fields)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _choices(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "none"


def validate(cfg: ModelConfig, ns: argparse.Namespace) -> None:
    """Check degrees against the GPUs, heads and sequence length; raise ConfigError with the fix."""
    g, a, kv = ns.gpus, cfg.num_attention_heads, cfg.kv_heads
    for name in ("gpus", "micro_batch", "tp", "sp", "dp", "ulysses", "node_size"):
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise ConfigError(f"{_flag(name)} must be a positive integer, got {v}")
    if ns.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory must be > 0 GB, got {ns.gpu_memory:g}")
    tp = ns.tp
    if tp is not None:
        if g % tp:
            raise ConfigError(f"--tp {tp} does not divide --gpus {g}: choose --tp from {_choices(_divisors(g))}, "
                              f"or use a multiple of {tp} GPUs")
        if a % tp:
            ok = [t for t in _divisors(a) if g % t == 0]
            raise ConfigError(f"--tp {tp} does not divide the {a} attention heads of {cfg.name}: "
                              f"choose --tp from {_choices(ok)}")
        if kv % tp and tp % kv:
            raise ConfigError(f"--tp {tp} and the {kv} kv heads of {cfg.name} must divide one another")
    rest = g // (tp or 1)
    for name in ("sp", "dp"):
        v = getattr(ns, name)
        if v is not None and rest % v:
            where = f"--gpus {g}" + (f" / --tp {tp} = {rest}" if tp else "")
            raise ConfigError(f"--{name} {v} does not divide {where}: choose --{name} from {_choices(_divisors(rest))}")
    if ns.sp is not None and ns.dp is not None and ns.sp * ns.dp != rest:
        raise ConfigError(f"--sp {ns.sp} x --dp {ns.dp} must equal the {rest} GPUs left after tp")
    if ns.ulysses is not None:
        u, heads = ns.ulysses, a // (tp or 1)
        what = f"{a} attention heads" + (f" ({heads} per tp rank)" if tp and tp > 1 else "")
        if heads % u:
            ok = [x for x in _divisors(heads) if x > 1 and rest % x == 0]
            raise ConfigError(f"the {what} of {cfg.name} are not divisible by --ulysses {u}: "
                              f"choose --ulysses from {_choices(ok)}, or drop it for ring attention")
        group = ns.sp if ns.sp is not None else rest  # the largest sequence-parallel group possible
        if group % u:
            raise ConfigError(f"--ulysses {u} must divide the sequence-parallel group ({group} GPUs)")
    if ns.sp is not None:
        s, sp = ns.seq_len, ns.sp
        unit = sp * (tp if tp and tp > 1 and ns.sequence_parallel else 1)
        if s % unit:
            lo, hi = s // unit * unit, -(-s // unit) * unit
            why = f"--sp {sp}" + (f" x --tp {tp} (Megatron sequence parallelism)" if unit != sp else "")
            raise ConfigError(f"--seq-len {s} cannot be split over {why}: use a multiple of {unit} "
                              f"(e.g. {lo or hi} or {hi}), or pad the sequence")


def _plan_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    return dict(micro_batch=ns.micro_batch, gpu_memory_gb=ns.gpu_memory, tp=ns.tp, sp=ns.sp, dp=ns.dp,
                sequence_parallel=ns.sequence_parallel, ulysses=ns.ulysses, strategies=ns.strategies,
                dtype_bytes=_DTYPE_BYTES[ns.dtype], recompute=ns.recompute, attention_kernel=ns.attention_kernel,
                zero_stage=ns.zero_stage, node_size=ns.node_size, nvlink_gbps=ns.nvlink_gbps, ib_gbps=ns.ib_gbps,
                peak_tflops=ns.peak_tflops, utilization=ns.utilization, implementation=ns.accounting)


_HEAD = ["", "layout", "tp", "sp", "u", "r", "dp", "act GB", "total GB", "fits", "comm MB/layer", "step s",
         "tok/s", "MFU", "note"]


def _rows(p, limit: int | None, show_all: bool) -> list[list[str]]:
    cands = [c for c in p.candidates if show_all or c.feasible]
    out = []
    for c in cands[:limit]:
        m, t = c.memory, c.time
        out.append(["*" if c is p.recommended else "", c.label, str(c.tp), str(c.sp), str(c.ulysses), str(c.ring),
                    str(c.dp), f"{m.activations / 1e9:.2f}" if m else "-", f"{m.total_gb:.2f}" if m else "-",
                    "yes" if c.fits else ("no" if c.feasible else "n/a"),
                    f"{c.comm_bytes / 1e6:.1f}" if c.comm else "-", f"{t.step:.4g}" if t else "-",
                    f"{t.tokens_per_s:.4g}" if t else "-", f"{t.mfu:.2f}" if t else "-", c.reason])
    return out


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [_HEAD]) for i in range(len(_HEAD) - 1)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [_HEAD] + rows]
    lines.insert(1, "-" * min(160, len(lines[0])))
    return "\n".join(lines)


def _print_table(rows: list[list[str]], plain: bool) -> None:
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(_plain(rows))
        return
    table = Table(show_lines=False, header_style="bold")
    for i, name in enumerate(_HEAD):
        table.add_column(name, justify="right" if 2 <= i <= 13 and i != 9 else "left",
                         overflow="fold", no_wrap=i != len(_HEAD) - 1)
    for r in rows:
        table.add_row(*map(Text, r), style="bold green" if r[0] == "*" else ("dim" if r[9] != "yes" else None))
    width = shutil.get_terminal_size((200, 40)).columns if sys.stdout.isatty() else 200
    Console(file=sys.stdout, width=max(width, 120)).print(table)


def _sweep(cfg: ModelConfig, ns: argparse.Namespace) -> tuple[list[int], dict[str, list[tuple]]]:
    """Per scheme and sequence length: ``(S, GB, s)``: the smallest memory per GPU of any of its layouts,
    and the seconds per sequence (``S / tokens per s``) of its fastest fitting layout (NaN when none fits).

    Seconds per sequence, not per step: layouts with more data parallelism take longer steps over more
    sequences, so only throughput compares them."""
    from ..plan import plan as run_plan

    unit = 2 * ns.gpus
    scaled = (ns.seq_len << k if k >= 0 else ns.seq_len >> -k for k in range(-5, 3))  # S/32 .. 4S
    lengths = sorted({max(unit, x // unit * unit) for x in scaled})
    kw = _plan_kwargs(ns)
    real_mem = kw.pop("gpu_memory_gb")
    lines: dict[str, list[tuple]] = {}
    for s in lengths:
        try:  # a huge memory budget: plan() then never refuses, and "fits" is judged against the real one
            p = run_plan(cfg, s, ns.gpus, gpu_memory_gb=1e12, **kw)
        except SeqParError:
            continue
        mem: dict[str, float] = {}
        speed: dict[str, float] = {}
        for c in p.candidates:
            if not c.feasible:
                continue
            gb = c.memory.total_gb
            mem[c.strategy] = min(mem.get(c.strategy, math.inf), gb)
            if gb <= real_mem:
                speed[c.strategy] = max(speed.get(c.strategy, 0.0), c.time.tokens_per_s)
        for name, gb in mem.items():
            lines.setdefault(name, []).append((s, gb, s / speed[name] if name in speed else math.nan))
    return lengths, lines


def _plot(cfg: ModelConfig, ns: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    _, lines = _sweep(cfg, ns)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in sorted(lines.items()):
        xs = [x[0] for x in pts]
        ax_m.plot(xs, [x[1] for x in pts], marker="o", label=name)
        ax_t.plot(xs, [x[2] for x in pts], marker="o", label=name)
    ax_m.axhline(ns.gpu_memory, color="k", ls="--", lw=1, label=f"{ns.gpu_memory:g} GB per GPU")
    for ax, ylabel in ((ax_m, "memory per GPU, GB (its smallest layout)"),
                       (ax_t, "seconds per sequence (its fastest fitting layout)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{cfg.name} on {ns.gpus} GPUs, micro-batch {ns.micro_batch}, recompute={ns.recompute}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_inference(cfg: ModelConfig, ns: argparse.Namespace) -> int:
    """``seqpar plan --inference``: the tp x sp split for one long prompt and its decode."""
    from ..plan.inference import plan_inference

    try:
        p = plan_inference(cfg, ns.seq_len, ns.gpus, new_tokens=ns.new_tokens, batch=ns.micro_batch,
                           gpu_memory_gb=ns.gpu_memory, dtype_bytes=_DTYPE_BYTES[ns.dtype], node_size=ns.node_size,
                           nvlink_gbps=ns.nvlink_gbps, ib_gbps=ns.ib_gbps, peak_tflops=ns.peak_tflops,
                           utilization=ns.utilization, hbm_gbps=ns.hbm_gbps)
    except SeqParError as e:
        print(f"seqpar plan: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    print(f"Inference of {cfg.name}: a {ns.seq_len}-token prompt and {ns.new_tokens} new tokens on {ns.gpus} GPUs "
          f"x {ns.gpu_memory:g} GB")
    print(f"Recommended: {p.reason}\n")
    print(p.table())
    return 0


def run(ns: argparse.Namespace) -> int:
    """Entry point of ``seqpar plan`` (returns the exit status)."""
    from ..plan import plan as run_plan

    if ns.inference:
        try:
            cfg = build_config(ns)
        except SeqParError as e:
            print(f"seqpar plan: error: {e}", file=sys.stderr)
            return 2
        return _run_inference(cfg, ns)

    try:
        if ns.plot:
            try:
                import matplotlib  # noqa: F401  (checked before any work is done)
            except ImportError:
                raise ConfigError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
        cfg = build_config(ns)
        validate(cfg, ns)
        p = run_plan(cfg, ns.seq_len, ns.gpus, **_plan_kwargs(ns))
    except SeqParError as e:
        print(f"seqpar plan: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        best = p.recommended
        print(f"Recommended: {best.label}  ({cfg.name}, {ns.seq_len} tokens, {ns.gpus} GPUs x {ns.gpu_memory:g} GB; "
              f"{best.memory.total_gb:.1f} GB/GPU, {best.time.tokens_per_s:.4g} tok/s)")
        print(f"Why: {p.reason}\n")
        rows = _rows(p, None if ns.all else ns.limit, ns.all)
        _print_table(rows, ns.plain)
        hidden = len(p.candidates) - len(rows)
        if hidden > 0:
            print(f"({hidden} more layouts: --all shows every one, infeasible ones included)")
    if ns.plot:
        _plot(cfg, ns, ns.plot)
        print(f"plot written to {ns.plot}", file=sys.stderr if ns.json else sys.stdout)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="recommend a sequence-parallel layout for a model, sequence length and cluster",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  seqpar plan llama3-8b --seq-len 128k --gpus 32\n"
               "  seqpar plan llama3-70b --seq-len 1M --gpus 256 --tp 8 --json\n"
               "  seqpar plan llama3-8b --seq-len 1M --gpus 8 --inference\n"
               "  seqpar plan --hidden 4096 --heads 32 --kv-heads 8 --layers 32 --ffn 14336 --vocab 128256 "
               "--seq-len 65536 --gpus 16\n")
    p.add_argument("model", nargs="?", help=f"registered model: {', '.join(sorted(MODELS))}")
    p.add_argument("--config", metavar="CONFIG.json", help="a Hugging Face config.json instead of a name")
    g = p.add_argument_group("model sizes (all five without a model; with one, they override it)")
    for name, help_ in (("hidden", "hidden size"), ("heads", "attention heads"), ("kv-heads", "key/value heads (GQA)"),
                        ("layers", "layers"), ("ffn", "FFN width"), ("vocab", "vocabulary"),
                        ("head-dim", "head dim (default hidden/heads)")):
        g.add_argument(f"--{name}", type=int, help=help_)
    p.add_argument("--seq-len", type=parse_tokens, required=True, help="tokens per sequence (131072, 128k, 1M)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--tp", type=int, help="fix the tensor-parallel degree (default: search)")
    p.add_argument("--sp", type=int, help="fix the sequence-parallel degree (default: search)")
    p.add_argument("--dp", type=int, help="fix the data-parallel degree (default: search)")
    p.add_argument("--ulysses", type=int, help="fix the Ulysses degree of usp (default: search)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="Megatron sequence parallelism inside the tp group (default on)")
    p.add_argument("--strategies", nargs="+", choices=PLAN_STRATEGIES, help="only these schemes (default all)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    p.add_argument("--attention-kernel", choices=("math", "flash"), default="math")
    p.add_argument("--accounting", choices=("paper", "seqpar"), default="paper",
                   help="activation accounting: Korthikanti et al.'s GPT layer, or what seqpar's Llama stores")
    p.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=1)
    p.add_argument("--node-size", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="intra-node GB/s per GPU (default 450)")
    p.add_argument("--ib-gbps", type=float, default=50.0, help="inter-node GB/s per GPU (default 50)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (default 989, H100)")
    p.add_argument("--utilization", type=float, default=0.5, help="fraction of peak reached (default 0.5)")
    p.add_argument("--inference", action="store_true",
                   help="plan long-context inference instead (seqpar.inference): the tp x sp split of the KV cache")
    p.add_argument("--new-tokens", type=int, default=256, help="(--inference) tokens to generate (default 256)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="(--inference) GPU memory bandwidth, GB/s (default 3350, H100 SXM)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="memory and step time against sequence length (matplotlib)")
    p.add_argument("--limit", type=int, default=20, help="table rows (default 20)")
    p.add_argument("--all", action="store_true", help="every layout, infeasible ones included")
    p.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    p.set_defaults(func=run)
