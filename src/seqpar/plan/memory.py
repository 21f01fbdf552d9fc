"""Activation and model-state memory per GPU (bytes).

Activation accounting follows Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv:2205.05198), section 4:
per layer, with fp16/bf16 activations (2 bytes), 1-byte dropout masks, a GPT
MLP of width ``4h`` and ``a`` heads of ``h/a`` (no GQA)::

    no parallelism            s*b*h*(34 + 5*a*s/h)
    tensor parallel t         s*b*h*(10 + 24/t + 5*a*s/(h*t))
    tensor + sequence par.    s*b*h*(34 + 5*a*s/h) / t
    ... + selective recompute s*b*h*34 / t          (drops the 5as/h term)
    full recompute            2*s*b*h  (/ t with sequence parallelism)

The formula is written as a sum of the stored tensors, each with its own
dtype size, so that it is exact for those assumptions and generalises:

=====================  =========================  ==========================
term                   paper (p=2, mask=1 byte)    general (p = dtype_bytes)
=====================  =========================  ==========================
norm inputs (2)        4sbh                       2p*s*b*h
QKV input              2sbh                       p*s*b*h
MLP input              2sbh                       p*s*b*h
dropout masks (2)      2sbh                       2*s*b*h (only with dropout)
Q, K, V                6sbh                       p*s*b*(a*d + 2*kv*d)  (GQA)
attention output       2sbh                       p*s*b*a*d
MLP hidden             16sbh (f=4h: 2 x 2sbf)     GELU 2p*s*b*f; SwiGLU 3p*s*b*f
scores                 5*a*s^2*b                  (2p+1)*a*s^2*b with dropout,
                                                  p*a*s^2*b without
=====================  =========================  ==========================

The first four rows are replicated across tensor-parallel ranks unless
Megatron sequence parallelism shards them; the rest is split by ``tp``.
SwiGLU stores the gate and up projections (``2pf``, input of the fused
SwiGLU whose backward recomputes ``silu``) plus the down-projection input
(``pf``). RMSNorm and LayerNorm both store their input (statistics are
ignored, as in the paper). ``attention_kernel="flash"`` (a fused kernel)
stores no scores: the term becomes the fp32 log-sum-exp, ``4*b*a*s`` bytes.
Selective recomputation drops the score term (and the log-sum-exp); full
recomputation keeps only the layer input ``p*s*b*h``.

Sequence parallelism over ``sp`` GPUs (Ulysses/ring/USP/all-gather) divides
``s`` by ``sp`` everywhere except what the strategy gathers: the all-gather
strategy keeps full K and V; the attention scores, if materialised, are
``[b, a/u, s/r, s]`` per GPU (Ulysses: ``a/u`` heads over all ``s`` queries;
ring and ``ring_qk_av``: ``s/sp`` query rows against all ``s`` keys; USP:
``a/u`` heads, ``s/r`` rows). ``ring`` with the ``math`` kernel is taken to
keep every step's block scores for backward (as autograd would);
``ring_qk_av`` materialises its ``[b, a, s/sp, s]`` scores whatever the kernel.

Outside the layers (paper section 4.3, no pipeline parallelism): the input
embedding dropout mask (``s*b*h`` bytes), the final norm input and the output
projection input (``p*s*b*h`` each) and the fp32 logits for the cross entropy
(``4*s*b*v``), i.e. the paper's ``sbh/t + 4sbh/t*(1 + v/h)`` with sequence
parallelism. Temporary buffers (communication buffers, gathered weights of
ZeRO-3, kernel workspaces) are not counted.

``implementation="seqpar"`` replaces all of the above with what seqpar's own
Llama-style model stores, tensor by tensor (:mod:`seqpar.plan.implementation`):
fused attention with its log-sum-exp, RoPE tables, RMSNorm internals, SwiGLU as
written and GQA. ``"paper"`` stays the default.
"""
from __future__ import annotations

import functools
import math

from seqpar.core.configs import ModelConfig, ModelLike, get_config
from seqpar.core.errors import ConfigError, check
from seqpar.plan.implementation import IMPLEMENTATIONS, seqpar_layer_terms, seqpar_non_layer_terms
from seqpar.plan.parallel_layout import ATTENTION_KERNELS, RECOMPUTE_MODES, ParallelLayout, resolve_parallel_layout

__all__ = [
    "layer_terms",
    "non_layer_terms",
    "hidden_state_bytes",
    "activation_terms_per_layer",
    "activation_memory_per_layer",
    "non_layer_activation_terms",
    "activation_memory",
    "parameter_count",
    "model_state_memory",
    "IMPLEMENTATIONS",
]

GB = 1e9  #: bytes per GB (decimal, as GPU vendors and the design notes use)


def hidden_state_bytes(model: ModelLike, seq_len: int, micro_batch: int, *, sp: int = 1,
                       dtype_bytes: int = 2) -> int:
    """Bytes of one ``[b, s/sp, h]`` hidden-state tensor on one GPU.

    Example: GPT-3 175B, b=32, s=2048, bf16 -> 1.61e9 bytes; with 8-way
    sequence parallelism 2.01e8 bytes (87.5 % saved).
    """
    cfg = get_config(model)
    check(seq_len % sp == 0, ConfigError, f"seq_len ({seq_len}) must be divisible by sp ({sp})")
    return dtype_bytes * micro_batch * (seq_len // sp) * cfg.hidden_size


def _check_modes(recompute: str, attention_kernel: str, dtype_bytes: int, implementation: str = "paper") -> None:
    check(implementation in IMPLEMENTATIONS, ConfigError,
          f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    check(recompute in RECOMPUTE_MODES, ConfigError,
          f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    check(attention_kernel in ATTENTION_KERNELS, ConfigError,
          f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
    check(isinstance(dtype_bytes, int) and dtype_bytes > 0, ConfigError,
          f"dtype_bytes must be a positive int, got {dtype_bytes!r}")


def layer_terms(cfg: ModelConfig, lay: ParallelLayout, recompute: str, dtype_bytes: int, attention_kernel: str,
                dropout: bool, implementation: str = "paper", causal: bool = True, mlp_tiles: int = 1
                ) -> dict[str, int]:
    """Named stored tensors of one layer of a resolved layout, in bytes (the module docstring's rows).

    ``mlp_tiles > 1`` (the MLP over sequence tiles, recomputed in backward) drops the MLP's hidden
    activations: only its input is kept.
    """
    if implementation == "seqpar":
        return seqpar_layer_terms(cfg, lay, recompute, dtype_bytes, causal, mlp_tiles)
    p, b, h, d = dtype_bytes, lay.micro_batch, cfg.hidden_size, cfg.d
    rep = b * lay.s_replicated  # token-rows of TP-replicated tensors
    loc = b * lay.s_local       # token-rows of TP-sharded tensors
    if recompute == "full":
        return {"layer_input": p * rep * h}
    terms: dict[str, int] = {
        "norm_inputs": 2 * p * rep * h,
        "qkv_input": p * rep * h,
        "mlp_input": p * rep * h,
        "dropout_masks": (2 * rep * h) if dropout else 0,
        "q": p * loc * lay.heads_tp * d,
        "k": p * _kv_elems(lay) * d,
        "v": p * _kv_elems(lay) * d,
        "attn_output": p * loc * lay.heads_tp * d,
        "mlp_hidden": 0 if mlp_tiles > 1 else (3 if cfg.mlp == "swiglu" else 2) * p * loc * lay.ffn_tp,
    }
    score_bytes_per_elem = 2 * p + 1 if dropout else p
    materialised = attention_kernel == "math" or lay.strategy == "ring_qk_av"
    if recompute == "selective":
        terms["scores"] = 0
    elif materialised:
        terms["scores"] = score_bytes_per_elem * lay.score_elements
    else:  # fused kernel: output (counted above) + fp32 log-sum-exp per query row and head
        terms["softmax_lse"] = 4 * b * lay.heads_attn * lay.q_rows
    return terms


def _kv_elems(lay: ParallelLayout) -> int:
    """K (or V) elements per GPU divided by head_dim: ``b * tokens * heads``."""
    return lay.micro_batch * lay.kv_stored_tokens * lay.kv_attn


def _layout_and_flags(model: ModelLike, seq_len: int, micro_batch: int, tp: int, sequence_parallel: bool,
                      recompute: str, dtype_bytes: int, sp: int, strategy: str | None,
                      ulysses: int | None, attention_kernel: str, dropout: bool | None,
                      implementation: str = "paper") -> tuple[ModelConfig, ParallelLayout, bool]:
    cfg = get_config(model)
    _check_modes(recompute, attention_kernel, dtype_bytes, implementation)
    lay = resolve_parallel_layout(cfg, seq_len, micro_batch, strategy=strategy, tp=tp, sp=sp, ulysses=ulysses,
                         sequence_parallel=sequence_parallel)
    drop = cfg.dropout > 0 if dropout is None else bool(dropout)
    return cfg, lay, drop


def activation_terms_per_layer(
    cfg: ModelLike, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
    recompute: str = "none", dtype_bytes: int = 2, sp: int = 1, strategy: str | None = None, *,
    ulysses: int | None = None, attention_kernel: str = "math", dropout: bool | None = None,
    implementation: str = "paper", causal: bool = True, mlp_tiles: int = 1,
) -> dict[str, int]:
    """Named stored tensors of one layer on one GPU, in bytes (see module docstring)."""
    c, lay, drop = _layout_and_flags(cfg, seq_len, micro_batch, tp, sequence_parallel, recompute, dtype_bytes,
                                     sp, strategy, ulysses, attention_kernel, dropout, implementation)
    return layer_terms(c, lay, recompute, dtype_bytes, attention_kernel, drop, implementation, causal, mlp_tiles)


def activation_memory_per_layer(
    cfg: ModelLike, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
    recompute: str = "none", dtype_bytes: int = 2, sp: int = 1, strategy: str | None = None, *,
    ulysses: int | None = None, attention_kernel: str = "math", dropout: bool | None = None,
    implementation: str = "paper", causal: bool = True, mlp_tiles: int = 1,
) -> int:
    """Activation bytes one transformer layer keeps for backward, per GPU.

    Korthikanti et al. 2022 (section 4): ``s*b*h*(34 + 5*a*s/h)`` without
    parallelism, ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` with tensor parallelism
    ``t``, divided by ``t`` with sequence parallelism; selective recompute drops
    the ``5as/h`` term, full recompute keeps ``2*s*b*h`` (``/t`` with SP).
    Exact for ``dtype_bytes=2``, ``ffn=4h`` GELU MLP, no GQA, dropout on
    (the default for ``gpt3-175b``) and ``attention_kernel="math"``.

    Args:
        cfg: registered model name, HF-style mapping or :class:`ModelConfig`.
        seq_len: ``s``, tokens per sequence (whole sequence, not per GPU).
        micro_batch: ``b``, sequences per micro-batch.
        tp: tensor-parallel degree ``t``.
        sequence_parallel: Megatron sequence parallelism inside the tp group.
        recompute: ``"none"``, ``"selective"`` (core attention) or ``"full"``.
        dtype_bytes: bytes per activation element (2 for fp16/bf16).
        sp: sequence-parallel degree across the ``strategy`` group.
        strategy: one of :data:`STRATEGIES`; ``None`` means ``"none"`` (sp=1).
        ulysses: Ulysses degree ``u`` for ``strategy="usp"`` (ring = sp/u).
        attention_kernel: ``"math"`` (stores scores; the paper) or ``"flash"``.
        dropout: store dropout masks; ``None`` uses ``cfg.dropout > 0``.
        implementation: ``"paper"`` (Korthikanti et al.'s GPT layer) or
            ``"seqpar"`` (what :class:`seqpar.models.LlamaForCausalLM` stores,
            see :mod:`seqpar.plan.implementation`).
        causal: causal attention (only the ``seqpar`` Ulysses accounting
            depends on it: the zigzag permutation).
        mlp_tiles: the MLP runs over this many sequence tiles (keeping only its input).

    Returns:
        Bytes, an exact integer.
    """
    return sum(activation_terms_per_layer(
        cfg, seq_len, micro_batch, tp, sequence_parallel, recompute, dtype_bytes, sp, strategy,
        ulysses=ulysses, attention_kernel=attention_kernel, dropout=dropout, implementation=implementation,
        causal=causal, mlp_tiles=mlp_tiles).values())


def non_layer_activation_terms(
    cfg: ModelLike, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
    dtype_bytes: int = 2, sp: int = 1, strategy: str | None = None, *, ulysses: int | None = None,
    dropout: bool | None = None, implementation: str = "paper", causal: bool = True, loss_chunk: int = 0,
    recompute: str = "none",
) -> dict[str, int]:
    """Activation bytes outside the layers, per GPU (paper section 4.3, no pipeline).

    ``embedding_dropout_mask`` (``s*b*h`` bytes, if dropout), ``final_norm_input``
    and ``output_input`` (``p*s*b*h`` each) and ``logits_fp32``
    (``4*s*b*ceil(v/t)``: vocab-parallel fp32 logits kept by the cross entropy).
    The first three are divided by ``t`` with sequence parallelism, all by ``sp``.
    ``implementation="seqpar"``: see :func:`seqpar.plan.implementation.seqpar_non_layer_terms`.
    ``loss_chunk > 0``: the chunked loss (no logits kept).
    """
    c, lay, drop = _layout_and_flags(cfg, seq_len, micro_batch, tp, sequence_parallel, "none", dtype_bytes,
                                     sp, strategy, ulysses, "math", dropout, implementation)
    return non_layer_terms(c, lay, dtype_bytes, drop, implementation, causal, loss_chunk, recompute)


def non_layer_terms(c: ModelConfig, lay: ParallelLayout, dtype_bytes: int, drop: bool,
                    implementation: str = "paper", causal: bool = True, loss_chunk: int = 0,
                    recompute: str = "none") -> dict[str, int]:
    """Named stored tensors outside the layers of a resolved layout, in bytes.

    ``loss_chunk > 0`` (the loss from the hidden states in token chunks) keeps, instead of the
    float32 logits, two float32 statistics per token.
    """
    if implementation == "seqpar":
        return seqpar_non_layer_terms(c, lay, dtype_bytes, causal, loss_chunk, recompute)
    p, h, b = dtype_bytes, c.hidden_size, lay.micro_batch
    rep = b * lay.s_replicated
    loss = 8 * b * lay.s_local if loss_chunk else 4 * b * lay.s_local * math.ceil(c.vocab_size / lay.tp)
    return {
        "embedding_dropout_mask": rep * h if drop else 0,
        "final_norm_input": p * rep * h,
        "output_input": p * rep * h,
        "loss_statistics_fp32" if loss_chunk else "logits_fp32": loss,
    }


def activation_memory(
    cfg: ModelLike, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
    recompute: str = "none", dtype_bytes: int = 2, sp: int = 1, strategy: str | None = None, *,
    ulysses: int | None = None, attention_kernel: str = "math", dropout: bool | None = None,
    implementation: str = "paper", causal: bool = True, mlp_tiles: int = 1, loss_chunk: int = 0,
    checkpoint_every: int = 1,
) -> int:
    """Total activation bytes per GPU: ``L * per_layer + non_layer`` terms (the stored ones, kept for backward).

    ``recompute="full"`` with ``checkpoint_every=k`` keeps ``ceil(L/k)`` layer inputs.
    """
    c = get_config(cfg)
    per_layer = activation_memory_per_layer(c, seq_len, micro_batch, tp, sequence_parallel, recompute,
                                            dtype_bytes, sp, strategy, ulysses=ulysses,
                                            attention_kernel=attention_kernel, dropout=dropout,
                                            implementation=implementation, causal=causal, mlp_tiles=mlp_tiles)
    extra = non_layer_activation_terms(c, seq_len, micro_batch, tp, sequence_parallel, dtype_bytes, sp,
                                       strategy, ulysses=ulysses, dropout=dropout, implementation=implementation,
                                       causal=causal, loss_chunk=loss_chunk, recompute=recompute)
    layers = -(-c.num_layers // checkpoint_every) if recompute == "full" else c.num_layers
    return layers * per_layer + sum(extra.values())


def parameter_count(model: ModelLike, tp: int = 1) -> int:
    """Parameters held by one tensor-parallel rank (``tp=1``: the whole model).

    Column/row-parallel matrices and the vocab-parallel embedding are split
    by ``tp`` (vocabulary padded up to a multiple of ``tp``); norms, the
    row-parallel output biases and learned position embeddings are
    replicated; K/V projections are replicated when ``kv_heads < tp``.
    GPT-3 175B counts 174.6e9, Llama 3 8B 8.03e9.
    """
    c = get_config(model)
    check(isinstance(tp, int) and tp > 0, ConfigError, f"tp must be a positive int, got {tp!r}")
    return _parameter_count(c, tp)


@functools.lru_cache(maxsize=4096)
def _parameter_count(c: ModelConfig, tp: int) -> int:
    a, kv, h, d, f = c.num_attention_heads, c.kv_heads, c.hidden_size, c.d, c.ffn_hidden_size
    check(a % tp == 0 and f % tp == 0 and (kv % tp == 0 or tp % kv == 0), ConfigError,
          f"tp={tp} does not divide heads ({a}), kv heads ({kv}) or ffn ({f})")
    q_t, kv_t, f_t = a * d // tp, max(kv // tp, 1) * d, f // tp
    n_mat = 3 if c.mlp == "swiglu" else 2
    attn = h * q_t + 2 * h * kv_t + q_t * h
    mlp = n_mat * h * f_t
    norm_w = (2 if c.norm == "layernorm" else 1) * h
    bias = (q_t + 2 * kv_t + h) + ((n_mat - 1) * f_t + h) if c.bias else 0
    layer = attn + mlp + 2 * norm_w + bias
    v_t = math.ceil(c.vocab_size / tp)
    emb = v_t * h * (1 if c.tied_embeddings else 2)
    pos = c.max_position_embeddings * h if c.rope_theta is None else 0  # type: ignore[operator]
    return c.num_layers * layer + emb + pos + norm_w


def model_state_memory(
    model: ModelLike, tp: int = 1, dp: int = 1, sp: int = 1, zero_stage: int = 0, *,
    param_bytes: int = 2, grad_bytes: int = 2, optimizer_bytes: int = 12,
) -> dict[str, int]:
    """Parameter, gradient and optimizer bytes per GPU.

    Mixed-precision Adam (Rajbhandari et al. 2020, ZeRO): 2-byte params,
    2-byte grads, 12 bytes of fp32 master weight + momentum + variance =
    16 bytes/param. Sequence-parallel ranks hold the same weights and their
    gradients are reduced together with data parallelism, so ZeRO shards over
    the ``dp * sp`` group (as DeepSpeed-Ulysses does): stage 1 shards the
    optimizer, 2 also gradients, 3 also parameters. Shards are rounded up.
    """
    check(zero_stage in (0, 1, 2, 3), ConfigError, f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    check(isinstance(dp, int) and dp > 0 and isinstance(sp, int) and sp > 0, ConfigError,
          f"dp and sp must be positive ints, got dp={dp!r}, sp={sp!r}")
    n = parameter_count(model, tp)
    g = dp * sp

    def shard(x: int, on: bool) -> int:
        return -(-x // g) if on else x

    return {
        "parameters": shard(n * param_bytes, zero_stage >= 3),
        "gradients": shard(n * grad_bytes, zero_stage >= 2),
        "optimizer": shard(n * optimizer_bytes, zero_stage >= 1),
    }
