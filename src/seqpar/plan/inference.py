"""Planning long-context inference: how to split the KV cache and the prefill of one prompt over GPUs.

For :mod:`seqpar.inference` (prefill sequence-parallel, every rank keeping the keys and
values of its own tokens, decode merged by log-sum-exp), per GPU and for every
``tp x sp = n_gpus`` (tp within a node):

* **memory**: the weights (split over tp, as :func:`~seqpar.plan.memory.parameter_count`),
  the KV cache (:func:`kv_cache_bytes`: tokens split over sp, kv heads over tp) and
  the prefill's transient activations of one layer on ``S/sp`` tokens;
* **prefill time**: the forward FLOPs of the whole prompt divided over every GPU, with
  ring K/V transfers overlapped with block compute (``max`` per ring step) and
  tensor-parallel all-reduces added;
* **decode time per token**: decode is memory-bound: each GPU reads its weights and its
  share of the cache once per token (at ``hbm_gbps``), then each layer pays its
  collectives' latency (one all-gather over sp, two all-reduces over tp) plus their bytes.

The recommendation is the fitting split with the least ``prefill + new_tokens * decode``.
The cache-size formula is the implementation's, to the byte (a test checks it against
:meth:`seqpar.inference.KVCache.nbytes`); the times are estimates, like the training planner's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from seqpar.core.configs import ModelConfig, ModelLike, get_config
from seqpar.core.errors import ConfigError, check
from seqpar.plan.memory import GB, parameter_count
from seqpar.plan.parallel_layout import divisors
from seqpar.plan.timing import Hardware, layer_flops, ring_time

__all__ = ["kv_cache_bytes", "InferenceOption", "InferencePlan", "plan_inference"]


def kv_cache_bytes(model: ModelLike, seq_len: int, *, batch: int = 1, sp: int = 1, tp: int = 1,
                   dtype_bytes: int = 2, window: int | None = None) -> int:
    """Bytes of keys and values one GPU holds for ``seq_len`` cached tokens (the fullest rank).

    ``2 * layers * batch * ceil(S / sp) * max(kv_heads / tp, 1) * head_dim * dtype_bytes``;
    with a sliding ``window`` on every layer, at most ``window`` tokens per layer (all of them
    possibly on one rank: the recent tokens sit together in the layout).  Llama 3 8B in bf16:
    128 KiB per token.
    """
    c = get_config(model)
    check(isinstance(seq_len, int) and seq_len > 0, ConfigError, f"seq_len must be a positive int, got {seq_len!r}")
    check(c.kv_heads % tp == 0 or tp % c.kv_heads == 0, ConfigError,
          f"tp={tp} neither divides nor is a multiple of the {c.kv_heads} kv heads")
    tokens = math.ceil(seq_len / sp) if window is None else min(window, seq_len)
    return 2 * c.num_layers * batch * tokens * max(c.kv_heads // tp, 1) * c.d * dtype_bytes


@dataclass
class InferenceOption:
    """One costed split (bytes and seconds per GPU)."""

    tp: int
    sp: int
    weight_bytes: int
    kv_bytes: int
    prefill_activation_bytes: int
    total_bytes: int
    fits: bool
    prefill_s: float
    decode_s_per_token: float
    decode_comm_bytes_per_token: int
    total_s: float

    @property
    def label(self) -> str:
        return f"tp{self.tp} x sp{self.sp}"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **asdict(self)}


@dataclass
class InferencePlan:
    """Every split considered, fitting ones first, fastest first; :attr:`recommended` and its :attr:`reason`."""

    model: str
    seq_len: int
    n_gpus: int
    new_tokens: int
    options: list[InferenceOption] = field(default_factory=list)
    recommended: InferenceOption | None = None
    reason: str = ""

    def table(self) -> str:
        head = (f"{'split':<12}{'weights GB':>11}{'KV GB':>9}{'total GB':>10}{'fits':>6}{'prefill s':>11}"
                f"{'decode ms/tok':>15}{'total s':>10}")
        rows = [head, "-" * len(head)]
        for o in self.options:
            rows.append(f"{o.label:<12}{o.weight_bytes / GB:>11.1f}{o.kv_bytes / GB:>9.1f}{o.total_bytes / GB:>10.1f}"
                        f"{'yes' if o.fits else 'no':>6}{o.prefill_s:>11.2f}{o.decode_s_per_token * 1e3:>15.2f}"
                        f"{o.total_s:>10.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "seq_len": self.seq_len, "n_gpus": self.n_gpus, "new_tokens": self.new_tokens,
                "recommended": None if self.recommended is None else self.recommended.label, "reason": self.reason,
                "options": [o.to_dict() for o in self.options]}


def _cost(c: ModelConfig, seq_len: int, tp: int, sp: int, batch: int, dtype_bytes: int, hw: Hardware,
          hbm_gbps: float, latency_us: float, gpu_memory_gb: float, new_tokens: int) -> InferenceOption:
    weights = parameter_count(c, tp) * dtype_bytes
    kv = kv_cache_bytes(c, seq_len + new_tokens, batch=batch, sp=sp, tp=tp, dtype_bytes=dtype_bytes)
    local = math.ceil(seq_len / sp)
    n_mat = 3 if c.mlp == "swiglu" else 2
    # one layer's largest transient on S/sp tokens: hidden + normed input + q/k/v + the MLP's intermediates
    act = batch * local * (3 * c.hidden_size + (c.num_attention_heads + 2 * c.kv_heads) * c.d // tp
                           + n_mat * c.ffn_hidden_size // tp) * dtype_bytes
    total = weights + kv + act
    speed = hw.flops_per_s
    fl = layer_flops(c, seq_len, batch, causal=True)
    compute = (fl["matmul"] + fl["attention"]) / (tp * sp) / speed
    ring_bw = hw.bandwidth(tp * sp > hw.node_size)
    tp_bw = hw.bandwidth(tp > hw.node_size)
    kv_block = 2 * batch * local * max(c.kv_heads // tp, 1) * c.d * dtype_bytes
    ring = ring_time(sp, compute, kv_block / ring_bw)  # transfers overlapped with block compute
    # Megatron TP + SP: an all-gather before and a reduce-scatter after attention and the MLP
    tp_bytes = 4 * (tp - 1) / tp * batch * local * c.hidden_size * dtype_bytes if tp > 1 else 0
    prefill = c.num_layers * (ring + tp_bytes / tp_bw)
    # decode: read the weights and this GPU's cache once, then per layer the collectives' latency and bytes
    sp_bytes = (sp - 1) * batch * c.num_attention_heads // tp * (c.d + 1) * 4 if sp > 1 else 0
    tp_dec = 2 * 2 * (tp - 1) / tp * batch * c.hidden_size * dtype_bytes if tp > 1 else 0
    collectives = (1 if sp > 1 else 0) + (2 if tp > 1 else 0)
    decode = (weights + kv) / (hbm_gbps * 1e9) + c.num_layers * (
        collectives * latency_us * 1e-6 + sp_bytes / ring_bw + tp_dec / tp_bw)
    return InferenceOption(tp=tp, sp=sp, weight_bytes=weights, kv_bytes=kv, prefill_activation_bytes=act,
                           total_bytes=total, fits=total <= gpu_memory_gb * GB, prefill_s=prefill,
                           decode_s_per_token=decode, decode_comm_bytes_per_token=c.num_layers * int(sp_bytes + tp_dec),
                           total_s=prefill + new_tokens * decode)


def plan_inference(model: ModelLike, seq_len: int, n_gpus: int, *, new_tokens: int = 256, batch: int = 1,
                   tp: int | None = None, gpu_memory_gb: float = 80.0, dtype_bytes: int = 2, node_size: int = 8,
                   nvlink_gbps: float = 450.0, ib_gbps: float = 50.0, peak_tflops: float = 989.0,
                   utilization: float = 0.5, hbm_gbps: float = 3350.0, latency_us: float = 15.0) -> InferencePlan:
    """Recommend a ``tp x sp`` split of ``n_gpus`` for one ``seq_len``-token prompt and ``new_tokens`` of decode.

    Args:
        model: registered name, HF-style mapping or :class:`~seqpar.configs.ModelConfig`.
        seq_len: prompt tokens; n_gpus: GPUs (``tp * sp``); new_tokens: tokens to generate.
        batch: sequences decoded together; gpu_memory_gb: per GPU, GB (1e9 bytes).
        tp: fix the tensor-parallel degree (default: every one that fits a node and splits the heads).
        dtype_bytes: weights, cache and activations (2 = bf16).
        node_size, nvlink_gbps, ib_gbps, peak_tflops, utilization: as the training planner.
        hbm_gbps: GPU memory bandwidth, GB/s (H100 SXM: 3350); latency_us: one small collective.
    Returns:
        an :class:`InferencePlan` (tp ranges over the divisors of ``n_gpus`` within a node that
        split the heads; sp is the rest).
    Raises:
        ConfigError: bad arguments, or no split fits (the message names the smallest memory needed).
    """
    c = get_config(model)
    for name, v in (("n_gpus", n_gpus), ("new_tokens", new_tokens + 1), ("batch", batch)):
        check(isinstance(v, int) and v > 0, ConfigError, f"{name} must be a positive int")
    hw = Hardware(peak_tflops=peak_tflops, utilization=utilization, nvlink_gbps=nvlink_gbps, ib_gbps=ib_gbps,
                  node_size=node_size)
    check(hbm_gbps > 0 and latency_us >= 0, ConfigError, "hbm_gbps must be > 0 and latency_us >= 0")
    options = []
    if tp is not None:
        check(isinstance(tp, int) and tp > 0 and n_gpus % tp == 0, ConfigError,
              f"tp={tp!r} must be a positive divisor of n_gpus={n_gpus}")
        check(c.num_attention_heads % tp == 0 and c.ffn_hidden_size % tp == 0
              and (c.kv_heads % tp == 0 or tp % c.kv_heads == 0), ConfigError,
              f"tp={tp} does not split the {c.num_attention_heads} heads, {c.kv_heads} kv heads and "
              f"{c.ffn_hidden_size} FFN columns of {c.name}")
    for t in [tp] if tp is not None else divisors(n_gpus):
        if tp is None and (t > node_size or c.num_attention_heads % t or c.ffn_hidden_size % t
                           or not (c.kv_heads % t == 0 or t % c.kv_heads == 0)):
            continue
        options.append(_cost(c, seq_len, t, n_gpus // t, batch, dtype_bytes, hw, hbm_gbps, latency_us,
                             gpu_memory_gb, new_tokens))
    check(bool(options), ConfigError, f"no tensor-parallel degree dividing {n_gpus} GPUs splits "
                                      f"{c.num_attention_heads} heads and {c.kv_heads} kv heads within a node of "
                                      f"{node_size}")
    options.sort(key=lambda o: (not o.fits, o.total_s))
    best = options[0]
    if not best.fits:
        need = min(o.total_bytes for o in options) / GB
        raise ConfigError(f"no split of {n_gpus} GPUs holds {c.name or 'the model'} with a {seq_len}-token cache: "
                          f"the smallest needs {need:.1f} GB per GPU (have {gpu_memory_gb:g}); add GPUs or shorten "
                          f"the context")
    runner_up = next((o for o in options[1:] if o.fits), None)
    why = (f"{best.label}: {best.total_bytes / GB:.1f} GB per GPU ({best.kv_bytes / GB:.1f} GB of it KV cache), "
           f"prefill {best.prefill_s:.2f} s, decode {best.decode_s_per_token * 1e3:.1f} ms/token")
    if runner_up is not None:
        why += f"; {runner_up.total_s / best.total_s:.2f}x faster overall than {runner_up.label}"
    return InferencePlan(model=c.name or "custom", seq_len=seq_len, n_gpus=n_gpus, new_tokens=new_tokens,
                         options=options, recommended=best, reason=why)
