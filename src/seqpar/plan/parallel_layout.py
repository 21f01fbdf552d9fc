"""Parallel layout of one transformer layer: who holds which tokens and heads.

A layout is ``tp x sp`` GPUs working on one sequence (``dp`` copies of that
run side by side). Rank order is the Megatron/DeepSpeed one: tensor-parallel
ranks innermost (contiguous), then the Ulysses group, then the ring group,
then data parallel. A group of ``size`` ranks ``stride`` apart therefore lies
inside one node of ``node_size`` GPUs iff ``stride * size`` divides
``node_size`` (:func:`group_spans_nodes`).

Strategies (``sp`` is the sequence-parallel degree, ``u x r = sp``):

``none``        no sequence parallelism (``sp == 1``); ``tp`` may still be > 1.
``megatron``    tensor parallel + Megatron sequence parallel (``sp == 1``).
``ulysses``     DeepSpeed-Ulysses: all-to-all seq<->heads, ``u = sp``.
``ring``        ring attention with online softmax, ``r = sp``.
``allgather``   all-gather of K and V over the ``sp`` group (Llama 3 CP style).
``usp``         Ulysses inside (``u``), ring across (``r``): Fang & Zhao 2024.
``ring_qk_av``  Li et al. 2021 ring self-attention: one ring pass for
                ``QK^T``, one for ``AV``; scores ``[b, a, s/sp, s]`` materialised.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqpar.core.configs import ModelConfig
from seqpar.core.errors import ConfigError, check
from seqpar.core.strategies import SP_STRATEGIES

__all__ = [
    "STRATEGIES", "SP_STRATEGIES", "RECOMPUTE_MODES", "ATTENTION_KERNELS",
    "ParallelLayout", "resolve_parallel_layout", "group_spans_nodes", "divisors",
]

STRATEGIES = ("none", "megatron", *SP_STRATEGIES)
RECOMPUTE_MODES = ("none", "selective", "full")
ATTENTION_KERNELS = ("math", "flash")


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [k for k in range(1, n + 1) if n % k == 0]


def group_spans_nodes(stride: int, size: int, node_size: int) -> bool:
    """True when a group of ``size`` ranks spaced ``stride`` apart leaves a node.

    Such a group covers ``stride * size`` consecutive ranks; it stays inside
    one node only when that span divides ``node_size``.
    """
    if size <= 1:
        return False
    span = stride * size
    return span > node_size or node_size % span != 0


def _pos_int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{what} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class ParallelLayout:
    """Per-GPU sizes of one layer under a parallel layout (element counts).

    Attributes:
        strategy, tp, sp, ulysses, ring: the layout (``ulysses * ring == sp``
            for ``usp``/``ulysses``/``ring``/``ring_qk_av``; ``allgather`` has
            ``ulysses == ring == 1``).
        sequence_parallel: Megatron SP inside the ``tp`` group is on (and tp > 1).
        seq_len, micro_batch: ``s`` and ``b``.
        s_local: tokens per sequence-parallel rank, ``s / sp``.
        s_replicated: tokens of the tensors Megatron TP replicates (norm
            inputs, dropout masks, QKV/MLP inputs): ``s_local / tp`` with SP,
            else ``s_local``.
        heads_tp, kv_tp, ffn_tp: query heads, key/value heads and FFN width
            per tensor-parallel rank (kv heads are replicated when kv < tp).
        heads_attn, kv_attn: query and key/value heads per GPU inside the
            attention core (after the Ulysses all-to-all; kv heads replicated
            up to one per rank when kv < u).
        q_rows: query rows per GPU inside the attention core.
        kv_stored_tokens: tokens of K and V each GPU keeps for backward.
        ring_block_tokens: tokens of one K/V block passed around the ring.
    """

    strategy: str
    tp: int
    sp: int
    ulysses: int
    ring: int
    sequence_parallel: bool
    seq_len: int
    micro_batch: int
    s_local: int
    s_replicated: int
    heads_tp: int
    kv_tp: int
    ffn_tp: int
    heads_attn: int
    kv_attn: int
    q_rows: int
    kv_stored_tokens: int
    ring_block_tokens: int

    @property
    def score_elements(self) -> int:
        """Attention-probability elements per GPU if materialised: ``b*heads*q_rows*s``."""
        return self.micro_batch * self.heads_attn * self.q_rows * self.seq_len

    @property
    def label(self) -> str:
        """Short human label such as ``"usp u=8 r=4"`` or ``"megatron tp=8"``."""
        st = self.strategy
        if st == "usp":
            core = f"usp u={self.ulysses} r={self.ring}"
        elif st in ("none", "megatron"):
            core = st
        else:
            core = f"{st} sp={self.sp}"
        if self.tp > 1:
            core += f" tp={self.tp}"
        return core


def resolve_parallel_layout(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int = 1,
    *,
    strategy: str | None = None,
    tp: int = 1,
    sp: int = 1,
    ulysses: int | None = None,
    sequence_parallel: bool = False,
) -> ParallelLayout:
    """Check a layout against the model shape and compute per-GPU sizes.

    Raises:
        ConfigError: with the reason the layout is impossible (for instance
            ``ulysses needs num_attention_heads ... divisible by ...``).
    """
    s = _pos_int(seq_len, "seq_len")
    b = _pos_int(micro_batch, "micro_batch")
    t = _pos_int(tp, "tp")
    n = _pos_int(sp, "sp")
    if strategy is None:
        check(n == 1, ConfigError, f"sp={n} > 1 needs a strategy, one of {SP_STRATEGIES}")
        strategy = "none"
    check(strategy in STRATEGIES, ConfigError, f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    a, kv, f = cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_hidden_size
    if strategy in ("none", "megatron"):
        check(n == 1, ConfigError, f"strategy {strategy!r} has no sequence-parallel group; got sp={n}")
    check(a % t == 0, ConfigError, f"num_attention_heads ({a}) must be divisible by tp ({t})")
    check(kv % t == 0 or t % kv == 0, ConfigError,
          f"num_key_value_heads ({kv}) and tp ({t}) must divide one another")
    check(f % t == 0, ConfigError, f"ffn_hidden_size ({f}) must be divisible by tp ({t})")
    check(s % n == 0, ConfigError, f"seq_len ({s}) must be divisible by the sequence-parallel degree ({n})")
    s_local = s // n
    spar = bool(sequence_parallel) and t > 1
    if spar:
        check(s_local % t == 0, ConfigError,
              f"Megatron sequence parallelism needs seq_len/sp ({s_local}) divisible by tp ({t})")
    a_t, kv_t, f_t = a // t, max(kv // t, 1), f // t
    heads_note = f"num_attention_heads ({a})" if t == 1 else f"num_attention_heads/tp ({a}/{t}={a_t})"
    kv_note = f"num_key_value_heads ({kv})" if t == 1 else f"num_key_value_heads per tp rank ({kv_t})"

    if strategy == "usp":
        check(ulysses is not None, ConfigError, "strategy 'usp' needs the ulysses degree (ulysses=u, ring = sp/u)")
        u = _pos_int(ulysses, "ulysses")
        check(n % u == 0, ConfigError, f"usp ulysses degree ({u}) must divide sp ({n})")
        r = n // u
    elif strategy == "ulysses":
        check(ulysses is None or ulysses == n, ConfigError,
              f"strategy 'ulysses' uses the whole sp group (ulysses={n}); got ulysses={ulysses}; use 'usp'")
        u, r = n, 1
    elif strategy in ("ring", "ring_qk_av"):
        u, r = 1, n
    else:  # none, megatron, allgather
        u, r = 1, 1

    if u > 1:
        check(a_t % u == 0, ConfigError,
              f"{strategy} needs {heads_note} divisible by the ulysses degree ({u}); heads={a_t}, u={u}")
        check(kv_t % u == 0 or u % kv_t == 0, ConfigError,
              f"{strategy} needs {kv_note} and the ulysses degree ({u}) to divide one another")
    heads_attn = a_t // u
    kv_attn = kv_t // u if kv_t % u == 0 else 1  # kv < u: each rank gets one replicated kv head

    if strategy in ("none", "megatron"):
        q_rows, kv_tok, blk = s, s, 0
    elif strategy == "ulysses":
        q_rows, kv_tok, blk = s, s, 0
    elif strategy in ("ring", "ring_qk_av"):
        q_rows, kv_tok, blk = s // r, s // r, s // r
    elif strategy == "allgather":
        q_rows, kv_tok, blk = s_local, s, 0
    else:  # usp
        q_rows, kv_tok, blk = s // r, s // r, s // r
    return ParallelLayout(
        strategy=strategy, tp=t, sp=n, ulysses=u, ring=r, sequence_parallel=spar,
        seq_len=s, micro_batch=b, s_local=s_local, s_replicated=s_local // t if spar else s_local,
        heads_tp=a_t, kv_tp=kv_t, ffn_tp=f_t, heads_attn=heads_attn, kv_attn=kv_attn,
        q_rows=q_rows, kv_stored_tokens=kv_tok, ring_block_tokens=blk,
    )
