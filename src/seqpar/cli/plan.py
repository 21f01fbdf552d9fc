"""``seqpar plan``: which sequence-parallel layout and memory settings to use, from the analytic model.

Takes a registered model (``llama3-8b``, ``llama3-70b``, ``gpt3-175b``...), a Hugging
Face ``config.json`` (``--config``) or explicit sizes (``--hidden --heads --layers
--ffn --vocab``; on top of a model they override it), the sequence length and the
cluster, and prints the recommendation with its one-line reason, then every layout
considered (fitting ones first, fastest first), each with the memory settings it needs
(recomputation, host offload, tiled MLP, chunked loss, ZeRO stage, optimizer offload: each
searched unless fixed by its flag). ``--max-seq-len`` answers the longest sequence that
fits instead; ``--emit-config run.toml`` writes the ``seqpar train`` config of the
recommendation; ``--json`` prints :meth:`Plan.to_dict`; ``--plot FILE.png`` draws memory
and step time against sequence length, one line per scheme (needs matplotlib).

Every argument is checked before planning; bad input exits with status 2 and one line
that names the fix in the flags typed (``--tp 4 does not divide --gpus 6: ...``); with
``--json`` that line also goes to stdout as ``{"error": ...}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
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
    """Check degrees against the GPUs and heads; raise ConfigError with the fix (a sequence that a
    degree does not divide is padded, as seqpar.shard pads it)."""
    g, a, kv = ns.gpus, cfg.num_attention_heads, cfg.kv_heads
    for name in ("gpus", "micro_batch", "tp", "sp", "dp", "ulysses", "node_size", "mlp_tiles", "checkpoint_every",
                 "steps"):
        v = getattr(ns, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"{_flag(name)} must be a positive integer, got {v}")
    for name in ("gpu_memory", "host_memory", "pcie_gbps", "nvlink_gbps", "ib_gbps", "peak_tflops"):
        v = getattr(ns, name)
        if not v > 0 and not (name == "host_memory" and v == 0):
            raise ConfigError(f"{_flag(name)} must be > 0, got {v:g}")
    if ns.loss_chunk is not None and ns.loss_chunk < 0:
        raise ConfigError(f"--loss-chunk must be >= 0 (0: the loss from the logits), got {ns.loss_chunk}")
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


def _accounting(ns: argparse.Namespace) -> str:
    if ns.accounting is None:
        return "seqpar" if ns.emit_config else "paper"
    if ns.emit_config and ns.accounting != "seqpar":
        raise ConfigError("--emit-config writes what seqpar train runs, which --accounting seqpar models (the default "
                          "with --emit-config): drop --accounting paper")
    return ns.accounting


def _options(ns: argparse.Namespace) -> dict[str, Any]:
    """The planner's options (Settings and Hardware fields) from the flags."""
    p = _DTYPE_BYTES[ns.dtype]
    impl = _accounting(ns)
    opts: dict[str, Any] = dict(
        micro_batch=ns.micro_batch, gpu_memory_gb=ns.gpu_memory, host_memory_gb=ns.host_memory,
        sequence_parallel=ns.sequence_parallel, dtype_bytes=p, attention_kernel=ns.attention_kernel,
        implementation=impl, recompute=ns.recompute, zero_stage=ns.zero_stage, offload=ns.offload,
        offload_optimizer=ns.offload_optimizer, checkpoint_every=ns.checkpoint_every, mlp_tiles=ns.mlp_tiles,
        loss_chunk=ns.loss_chunk, node_size=ns.node_size, nvlink_gbps=ns.nvlink_gbps, ib_gbps=ns.ib_gbps,
        pcie_gbps=ns.pcie_gbps, peak_tflops=ns.peak_tflops, utilization=ns.utilization)
    if impl == "seqpar":  # seqpar train keeps weights, gradients and AdamW's moments in the model dtype
        opts.update(param_bytes=p, grad_bytes=p, optimizer_bytes=2 * p)
    return opts


def _degrees(ns: argparse.Namespace) -> dict[str, Any]:
    return dict(tp=ns.tp, sp=ns.sp, dp=ns.dp, ulysses=ns.ulysses, strategies=ns.strategies)


#: how a NothingFits suggestion reads in flags: what was typed, to drop (so the planner searches it)
def _typed(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + name.replace("_", "-")
    return f"{_flag(name)} {value}"


def _nothing_fits_line(e: Any) -> str:
    words = []
    for name, value in e.suggestions:
        if name == "more GPUs":
            words.append("more --gpus")
        elif name == "a shorter sequence":
            words.append("a shorter --seq-len")
        else:
            words.append(f"dropping {_typed(name, value)} (the planner then searches it)")
    return e.head + ("; try " + ", ".join(words) if words else "")


def _fail(ns: argparse.Namespace, message: str, extra: dict[str, Any] | None = None) -> int:
    print(f"seqpar plan: error: {message}", file=sys.stderr)
    if getattr(ns, "json", False):  # a script parsing stdout gets the error too
        print(json.dumps({"error": message, **(extra or {})}, indent=2))
    return 2


def _run_inference(cfg: ModelConfig, ns: argparse.Namespace) -> int:
    """``seqpar plan --inference``: the tp x sp split for one long prompt and its decode."""
    from ..plan.inference import plan_inference

    training_only = {"strategies": "--strategies", "sp": "--sp", "dp": "--dp", "ulysses": "--ulysses",
                     "recompute": "--recompute", "zero_stage": "--zero-stage", "offload": "--offload",
                     "offload_optimizer": "--offload-optimizer", "mlp_tiles": "--mlp-tiles",
                     "loss_chunk": "--loss-chunk", "checkpoint_every": "--checkpoint-every",
                     "emit_config": "--emit-config", "max_seq_len": "--max-seq-len"}
    given = [flag for name, flag in training_only.items() if getattr(ns, name) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} plan(s) training, not --inference (which splits the KV cache and the "
                          f"prefill over --tp x sp, sp taking the rest): drop {', '.join(given)}")
    if ns.seq_len is None:
        raise ConfigError("--inference needs --seq-len (the prompt's tokens)")
    p = plan_inference(cfg, ns.seq_len, ns.gpus, new_tokens=ns.new_tokens, batch=ns.micro_batch, tp=ns.tp,
                       gpu_memory_gb=ns.gpu_memory, dtype_bytes=_DTYPE_BYTES[ns.dtype], node_size=ns.node_size,
                       nvlink_gbps=ns.nvlink_gbps, ib_gbps=ns.ib_gbps, peak_tflops=ns.peak_tflops,
                       utilization=ns.utilization, hbm_gbps=ns.hbm_gbps)
    if ns.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    print(f"Inference of {cfg.name}: a {ns.seq_len}-token prompt and {ns.new_tokens} new tokens on {ns.gpus} GPUs "
          f"x {ns.gpu_memory:g} GB")
    print(f"Recommended: {p.reason}\n")
    print(p.table())
    return 0


def _emit(cfg: ModelConfig, ns: argparse.Namespace, p: Any) -> None:
    from ..plan.emit import to_toml, train_config

    conf = train_config(cfg, p.recommended, p.settings, seq_len=p.seq_len, device=ns.device, steps=ns.steps)
    best = p.recommended
    text = to_toml(conf, f"seqpar train config for {best.label} [{best.settings.label}], planned by:\n"
                         f"  seqpar plan {' '.join(sys.argv[2:]) if sys.argv[1:2] == ['plan'] else '...'}\n"
                         f"run: torchrun --nproc-per-node {min(ns.gpus, ns.node_size)}"
                         + (f" --nnodes {ns.gpus // ns.node_size}" if ns.gpus > ns.node_size else "")
                         + f" -m seqpar.cli train {ns.emit_config}")
    Path(ns.emit_config).write_text(text)
    print(f"train config written to {ns.emit_config} ({ns.gpus} processes: torchrun ... -m seqpar.cli train "
          f"{ns.emit_config})", file=sys.stderr if ns.json else sys.stdout)


def _report(cfg: ModelConfig, ns: argparse.Namespace, p: Any, longest: Any) -> None:
    from .plan_report import print_table

    best = p.recommended
    if ns.json:
        print(json.dumps(longest.to_dict() if longest is not None else p.to_dict(), indent=2))
        return
    if longest is not None:
        print(f"Longest sequence: {longest.seq_len} tokens ({longest.seq_len / 1024:g}K) for {cfg.name} on "
              f"{ns.gpus} GPUs x {ns.gpu_memory:g} GB ({ns.host_memory:g} GB host per node)")
    m, t = best.memory, best.time
    print(f"Recommended: {best.label}  ({cfg.name}, {p.seq_len} tokens, {ns.gpus} GPUs x {ns.gpu_memory:g} GB; "
          f"{m.total_gb:.1f} GB/GPU at the {m.peak_phase}, {t.tokens_per_s:.4g} tok/s, MFU {t.mfu:.2f}; "
          f"{best.settings.label})")
    print(f"Why: {p.reason}\n")
    shown = print_table(p.candidates, best, None if ns.all else ns.limit, ns.all, ns.plain)
    hidden = len(p.candidates) - shown
    if hidden > 0:
        print(f"({hidden} more layouts: --all shows every one, infeasible ones included)")


def _run(ns: argparse.Namespace) -> int:
    from ..plan import max_seq_len, plan
    from ..plan.planner import NothingFits, candidates_anyway

    if ns.plot:
        try:
            import matplotlib  # noqa: F401  (checked before any work is done)
        except ImportError:
            raise ConfigError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    cfg = build_config(ns)
    if ns.inference:
        return _run_inference(cfg, ns)
    if ns.seq_len is None and not ns.max_seq_len:
        raise ConfigError("give --seq-len TOKENS (e.g. 128k), or --max-seq-len for the longest that fits")
    validate(cfg, ns)
    options = _options(ns)
    try:
        if ns.max_seq_len:
            kw = {"limit": ns.seq_len} if ns.seq_len else {}
            longest = max_seq_len(cfg, ns.gpus, **kw, **_degrees(ns), **options)
            p = longest.plan
        else:
            longest, p = None, plan(cfg, ns.seq_len, ns.gpus, **_degrees(ns), **options)
    except NothingFits as e:
        line = _nothing_fits_line(e)
        extra = None
        if ns.all or ns.json:  # what was asked for, even though nothing fits
            cands = candidates_anyway(cfg, ns.seq_len or 1024, ns.gpus, **_degrees(ns), **options)
            if ns.json:
                extra = {"candidates": [c.to_dict() for c in cands]}
            else:
                from .plan_report import print_table

                print_table(cands, None, None, True, ns.plain)
        return _fail(ns, line, extra)
    _report(cfg, ns, p, longest)
    if ns.emit_config:
        _emit(cfg, ns, p)
    if ns.plot:
        from .plan_report import plot

        plot(cfg, ns, {**_degrees(ns), **options}, ns.plot, plan)
        print(f"plot written to {ns.plot}", file=sys.stderr if ns.json else sys.stdout)
    return 0


def run(ns: argparse.Namespace) -> int:
    """Entry point of ``seqpar plan`` (returns the exit status; bad input: one line, status 2, no traceback)."""
    try:
        return _run(ns)
    except SeqParError as e:
        return _fail(ns, str(e))
    except OSError as e:  # an output file that cannot be written
        return _fail(ns, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
    except ValueError as e:  # e.g. a number the model cannot use
        return _fail(ns, str(e))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="recommend a sequence-parallel layout and memory settings for a model, length and cluster",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  seqpar plan llama3-8b --seq-len 128k --gpus 32\n"
               "  seqpar plan llama3-70b --seq-len 128k --gpus 32\n"
               "  seqpar plan llama3-8b --gpus 8 --max-seq-len --accounting seqpar\n"
               "  seqpar plan llama3-8b --seq-len 1M --gpus 8 --emit-config run.toml\n"
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
    p.add_argument("--seq-len", type=parse_tokens, help="tokens per sequence (131072, 128k, 1M); with --max-seq-len "
                                                        "the most to consider")
    p.add_argument("--max-seq-len", action="store_true", help="answer the longest sequence that fits, and how")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--host-memory", type=float, default=2000.0,
                   help="host GB per node, for offloaded bytes (default 2000, a DGX H100)")
    p.add_argument("--tp", type=int, help="fix the tensor-parallel degree (default: search)")
    p.add_argument("--sp", type=int, help="fix the sequence-parallel degree (default: search)")
    p.add_argument("--dp", type=int, help="fix the data-parallel degree (default: search)")
    p.add_argument("--ulysses", type=int, help="fix the Ulysses degree of usp (default: search)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="Megatron sequence parallelism inside the tp group (default on)")
    p.add_argument("--strategies", nargs="+", choices=PLAN_STRATEGIES, help="only these schemes (default all)")
    m = p.add_argument_group("memory settings (each searched unless given)")
    m.add_argument("--recompute", choices=("none", "selective", "full"))
    m.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="checkpointed layer inputs in host memory (with --recompute full)")
    m.add_argument("--checkpoint-every", type=int, help="checkpoint every k-th layer's input (with --recompute full)")
    m.add_argument("--mlp-tiles", type=int, help="the MLP over this many sequence tiles (1: off)")
    m.add_argument("--loss-chunk", type=int, help="tokens per loss chunk, no logits kept (0: the loss from logits)")
    m.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    m.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="sharded weights, gradients and optimizer state in host memory (with --zero-stage 2/3)")
    p.add_argument("--attention-kernel", choices=("math", "flash"), default="math")
    p.add_argument("--accounting", choices=("paper", "seqpar"),
                   help="activation accounting: Korthikanti et al.'s GPT layer (default), or what seqpar's model "
                        "stores (the default with --emit-config)")
    p.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--node-size", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="intra-node GB/s per GPU (default 450)")
    p.add_argument("--ib-gbps", type=float, default=50.0, help="inter-node GB/s per GPU (default 50)")
    p.add_argument("--pcie-gbps", type=float, default=50.0, help="host <-> GPU GB/s per GPU (default 50)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (default 989, H100)")
    p.add_argument("--utilization", type=float, default=0.5, help="fraction of peak reached (default 0.5)")
    p.add_argument("--inference", action="store_true",
                   help="plan long-context inference instead (seqpar.inference): the tp x sp split of the KV cache")
    p.add_argument("--new-tokens", type=int, default=256, help="(--inference) tokens to generate (default 256)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="(--inference) GPU memory bandwidth, GB/s (default 3350, H100 SXM)")
    p.add_argument("--emit-config", metavar="RUN.toml", help="write the seqpar train config of the recommendation")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(--emit-config) device (default cuda)")
    p.add_argument("--steps", type=int, default=100, help="(--emit-config) training steps (default 100)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="memory and step time against sequence length (matplotlib)")
    p.add_argument("--limit", type=int, default=20, help="table rows (default 20)")
    p.add_argument("--all", action="store_true", help="every layout, infeasible ones included")
    p.add_argument("--plain", action="store_true", help="plain-text table even if rich is installed")
    p.set_defaults(func=run)
