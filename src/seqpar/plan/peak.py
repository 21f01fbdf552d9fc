"""Peak bytes per GPU of one training step under the memory settings seqpar runs.

Stored activations (what backward keeps, :mod:`seqpar.plan.memory`) are most of it, but not
all: the peak comes at one moment of the step, when stored activations meet the working set of
what runs then.  Four moments compete (``b`` micro-batch, ``loc``/``rep`` the token rows of
tp-sharded / tp-replicated tensors, ``p`` the activation dtype size, ``acc = max(p, 4)``,
``V_t = ceil(V / tp)``, ``c = min(loss_chunk, loc)``):

``loss forward``   stored activations + the logits ``loc V_t p`` (and their float32 copy when
                   ``p < 4``); chunked loss: one chunk's logits ``c V_t acc`` (+ ``c V_t p``).
``loss backward``  stored + the logits' gradient ``loc V_t acc`` (+ its cast ``loc V_t p``);
                   chunked: a chunk's logits, the hidden-state gradient ``loc h p`` and the
                   LM head's float32 gradient accumulator ``V_t h acc`` (+ the matmul buffer
                   ``V_t h p`` when ``p < 4``).
``layer backward`` the last layer's backward while every stored activation but the loss's is
                   alive: the incoming gradient ``rep h p``, the larger of the MLP's
                   (``2 loc f_t p``: SiLU's and the product's gradients; tiled: one tile's
                   replay and gradients) and attention's (``q, k, v`` gradients and the output
                   gradient); ``recompute="full"``: plus the replayed layer (or chain of
                   ``checkpoint_every`` layers) as ``"selective"`` stores it, and with
                   ``offload`` the two checkpoints on the device (the one replayed, the one
                   prefetched).  Plus this layer's and the head's gradients.
``optimizer``      every gradient, plus AdamW's and clipping's temporaries (about twice the
                   local parameter bytes).

Model state: ZeRO 0 keeps parameters, gradients and optimizer state whole; ZeRO 2/3 (FSDP2 over
``dp * sp`` ranks ``g``) shard them by ``g``, and while a step runs hold unsharded copies (each
beside its flat all-gather buffer until the next gather): ZeRO 3 one layer at a loss outside the
model, the root unit (embedding, final norm, LM head) twice and a layer at the chunked loss
(inside the model's forward), the root and three layers' worth in a layer's backward (the layer,
the one prefetched, the buffer); ZeRO 2 every unit from its forward to its backward.  Each
unit's unsharded gradients live until they are reduce-scattered.  ``offload_optimizer`` keeps the sharded parameters,
gradients and optimizer state in host memory (FSDP2's ``CPUOffloadPolicy``); ``offload`` the
checkpointed layer inputs.  Host bytes are reported separately (``MemoryBreakdown.host``): a plan
whose host bytes per node exceed the node's memory does not fit either.

On CPU (float32, ``implementation="seqpar"``) this is validated against the CPU allocator's own
count of one step's peak (``benchmarks/memory_peak.py``); the ``"paper"`` accounting uses the
same moments with Korthikanti et al.'s stored tensors.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from seqpar.core.configs import ModelConfig
from seqpar.core.errors import ConfigError, check
from seqpar.plan.memory import layer_terms, non_layer_terms, parameter_count
from seqpar.plan.parallel_layout import RECOMPUTE_MODES, ParallelLayout

__all__ = ["MemorySettings", "MemoryBreakdown", "ZERO_STAGES", "peak_memory"]

#: ZeRO stages seqpar's trainer runs (stage 1 can be planned when given explicitly)
ZERO_STAGES = (0, 2, 3)


@dataclass(frozen=True)
class MemorySettings:
    """The memory settings of a run (``seqpar train``'s keys of the same names).

    ``recompute`` ``"none" | "selective" | "full"``; ``offload`` (with ``"full"``) the checkpointed
    layer inputs in host memory; ``checkpoint_every`` (with ``"full"``) the k-th layer's input only;
    ``mlp_tiles`` the MLP over sequence tiles; ``loss_chunk`` tokens per chunk of the loss from the
    hidden states (0: the loss from the logits); ``zero_stage`` 0-3; ``offload_optimizer`` (ZeRO >= 2)
    the sharded model state in host memory.
    """

    recompute: str = "none"
    offload: bool = False
    checkpoint_every: int = 1
    mlp_tiles: int = 1
    loss_chunk: int = 0
    zero_stage: int = 0
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        check(self.recompute in RECOMPUTE_MODES, ConfigError,
              f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        check(self.zero_stage in (0, 1, 2, 3), ConfigError, f"zero_stage must be 0-3, got {self.zero_stage!r}")
        check(not self.offload or self.recompute == "full", ConfigError,
              "offload keeps the checkpointed layer inputs in host memory: it needs recompute='full'")
        check(not self.offload_optimizer or self.zero_stage >= 2, ConfigError,
              "offload_optimizer keeps FSDP2's sharded state in host memory: it needs zero_stage 2 or 3")
        for name in ("checkpoint_every", "mlp_tiles"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, ConfigError, f"{name} must be a positive int, got {v!r}")
        check(self.checkpoint_every == 1 or self.recompute == "full", ConfigError,
              "checkpoint_every > 1 chains layers between checkpoints: it needs recompute='full'")
        check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, ConfigError,
              f"loss_chunk must be an int >= 0 (0: the loss from the logits), got {self.loss_chunk!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Short human label, e.g. ``"full+offload, tiles 8, loss/4096, zero3+opt-offload"``."""
        parts = [self.recompute + ("+offload" if self.offload else "")
                 + (f"/{self.checkpoint_every}" if self.checkpoint_every > 1 else "")]
        if self.mlp_tiles > 1:
            parts.append(f"tiles {self.mlp_tiles}")
        if self.loss_chunk:
            parts.append(f"loss/{self.loss_chunk}")
        parts.append(f"zero{self.zero_stage}" + ("+opt-offload" if self.offload_optimizer else ""))
        return ", ".join(parts)


@dataclass
class MemoryBreakdown:
    """Bytes per GPU at the step's peak; ``total`` is that peak.

    ``activations`` are the stored ones (on the device), ``transient`` the working set of the
    moment of the peak (``peak_phase``) beyond them, ``parameters``/``gradients``/``optimizer``
    the model state on the device then; ``host`` the bytes this GPU keeps in host memory.
    """

    activations: int
    parameters: int
    gradients: int
    optimizer: int
    activation_per_layer: int = 0
    activation_non_layer: int = 0
    transient: int = 0
    host: int = 0
    peak_phase: str = ""

    @property
    def total(self) -> int:
        return self.activations + self.parameters + self.gradients + self.optimizer + self.transient

    @property
    def peak(self) -> int:
        """The device peak (``total``)."""
        return self.total

    @property
    def total_gb(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "activations": self.activations, "parameters": self.parameters, "gradients": self.gradients,
            "optimizer": self.optimizer, "activation_per_layer": self.activation_per_layer,
            "activation_non_layer": self.activation_non_layer, "transient": self.transient, "host": self.host,
            "peak_phase": self.peak_phase, "total": self.total, "total_gb": round(self.total_gb, 4),
        }


@dataclass(frozen=True)
class _Bytes:
    """Element sizes: activations ``p`` (and ``acc = max(p, 4)``), parameters, gradients, optimizer."""

    p: int
    param: int
    grad: int
    optimizer: int

    @property
    def acc(self) -> int:
        return max(self.p, 4)


@functools.lru_cache(maxsize=1024)
def _units(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """Parameters of one decoder layer and of the root unit (embedding, final norm, LM head), per tp rank."""
    from dataclasses import replace

    one, two = parameter_count(replace(cfg, num_layers=1), tp), parameter_count(replace(cfg, num_layers=2), tp)
    return two - one, one - (two - one)


def _state(cfg: ModelConfig, lay: ParallelLayout, dp: int, ms: MemorySettings, b: _Bytes) -> dict[str, int]:
    """Model-state bytes: resident (device / host) and the unsharded working copies of a running step."""
    n = parameter_count(cfg, lay.tp)
    g = dp * lay.sp
    layer, root = _units(cfg, lay.tp)
    z = ms.zero_stage

    def shard(x: int, on: bool) -> int:
        return -(-x // g) if on else x

    params, grads, opt = shard(n * b.param, z >= 3), shard(n * b.grad, z >= 2), shard(n * b.optimizer, z >= 1)
    # unsharded copies while a step runs (FSDP2): ZeRO 3 gathers each unit when it runs, its flat
    # all-gather buffer living beside the unsharded parameters until the next gather; ZeRO 2 keeps every
    # unit gathered from its forward to its backward.  Per moment: (loss with the logits, loss inside the
    # model's forward: the chunked one, layer backward)
    work = {"loss": 0, "loss_inside": 0, "layer": 0}
    work_grads = 0
    if z >= 2 and (g > 1 or ms.offload_optimizer):  # offloaded state is copied in even on one GPU
        if z == 3:
            work = {"loss": layer, "loss_inside": 2 * root + layer, "layer": root + 3 * layer}
        else:
            work = {k: n + root + layer for k in work}
        work_grads = (root + layer) * b.grad  # unsharded until reduce-scattered
    host = 0
    if ms.offload_optimizer:
        host, params, grads, opt = params + grads + opt, 0, 0, 0
    return {"params": params, "grads": grads, "optimizer": opt,
            **{f"work_{k}": v * b.param for k, v in work.items()}, "work_grads": work_grads, "host": host,
            "layer": layer * b.grad, "root": root * b.grad}


@functools.lru_cache(maxsize=65536)
def _layer_sum(cfg: ModelConfig, lay: ParallelLayout, recompute: str, p: int, kernel: str, dropout: bool,
               implementation: str, causal: bool, tiles: int) -> int:
    return sum(layer_terms(cfg, lay, recompute, p, kernel, dropout, implementation, causal, tiles).values())


def _loss_phases(cfg: ModelConfig, lay: ParallelLayout, ms: MemorySettings, b: _Bytes) -> tuple[int, int]:
    """Working bytes of the loss beyond the stored activations: (forward, backward)."""
    p, acc, h = b.p, b.acc, cfg.hidden_size
    loc = lay.micro_batch * lay.s_local
    v = math.ceil(cfg.vocab_size / lay.tp)
    half = p < acc  # half-precision logits are upcast (and their gradient cast back)
    if not ms.loss_chunk:
        return loc * v * (p + (acc if half else 0)), loc * v * (acc + (p if half else 0))
    c = min(ms.loss_chunk, loc)
    gathered = loc * h * p if lay.sequence_parallel else 0  # SP: the tp group's tokens, gathered
    fwd = c * v * (acc + (p if half else 0)) + gathered
    bwd = fwd + loc * h * p + v * h * acc + (v * h * p if half else 0)
    return fwd, bwd


def _layer_backward(cfg: ModelConfig, lay: ParallelLayout, ms: MemorySettings, b: _Bytes,
                    attention_kernel: str, dropout: bool, implementation: str, causal: bool) -> int:
    """Working bytes of the last layer's backward beyond the stored activations (see the module docstring)."""
    p, acc, h, d = b.p, b.acc, cfg.hidden_size, cfg.d
    rep, loc = lay.micro_batch * lay.s_replicated, lay.micro_batch * lay.s_local
    f = lay.ffn_tp
    if ms.mlp_tiles > 1:
        t_loc, t_rep = -(-loc // ms.mlp_tiles), -(-rep // ms.mlp_tiles)
        # the input-gradient buffer of the whole block, one tile replayed (norm, gate_up, SiLU and product)
        # and that tile's gradients
        mlp = rep * h * p + t_rep * h * (2 * acc + p) + t_loc * f * p * (4 + 2)
    else:
        mlp = 2 * loc * f * p  # SiLU's and the product's gradients beside the down projection's
    q_rows = lay.micro_batch * lay.q_rows
    kv_rows = lay.micro_batch * (lay.seq_len if lay.strategy == "allgather" else lay.q_rows)  # all-gather: all K/V
    attn = 2 * (q_rows * lay.heads_attn + 2 * kv_rows * lay.kv_attn) * d * p  # q, k, v, their gradients
    if lay.strategy in ("ring", "usp") and lay.ring > 1:
        attn += 2 * lay.micro_batch * lay.ring_block_tokens * lay.kv_attn * d * (p + acc)  # blocks in flight
    if lay.strategy == "ring_qk_av" or (implementation == "paper" and attention_kernel == "math"):
        # the scores (replayed unless kept) and their gradient; a ring's math kernel one block at a time
        blockwise = lay.strategy in ("ring", "usp") and lay.ring > 1
        scores = lay.score_elements // lay.ring if blockwise else lay.score_elements
        attn += (1 if ms.recompute == "none" else 2) * acc * scores
    work = rep * h * p + max(mlp, attn)
    if ms.recompute == "full":
        replay = _layer_sum(cfg, lay, "selective", p, attention_kernel, dropout, implementation, causal,
                            ms.mlp_tiles)
        # the replay's first norm keeps the checkpoint itself; a chain replays k layers before backward
        work += ms.checkpoint_every * replay - p * rep * h
        if ms.offload:
            work += 2 * p * rep * h  # the replayed checkpoint and the prefetched one, on the device
    return work


def peak_memory(cfg: ModelConfig, lay: ParallelLayout, dp: int, ms: MemorySettings, *, dtype_bytes: int = 2,
                param_bytes: int = 2, grad_bytes: int = 2, optimizer_bytes: int = 12,
                attention_kernel: str = "flash", dropout: bool = False, implementation: str = "paper",
                causal: bool = True) -> MemoryBreakdown:
    """Device peak and host bytes per GPU of one training step (see the module docstring).

    Args:
        cfg, lay, dp: the model, a resolved layout and the data-parallel degree.
        ms: the memory settings.
        dtype_bytes, param_bytes, grad_bytes, optimizer_bytes: element sizes (activations, and per
            parameter: weights, gradients, optimizer state).
        attention_kernel, dropout, implementation, causal: as :func:`seqpar.plan.activation_memory`.
    """
    b = _Bytes(dtype_bytes, param_bytes, grad_bytes, optimizer_bytes)
    per_layer = _layer_sum(cfg, lay, ms.recompute, dtype_bytes, attention_kernel, dropout, implementation, causal,
                           ms.mlp_tiles)
    extra_terms = non_layer_terms(cfg, lay, dtype_bytes, dropout, implementation, causal, ms.loss_chunk,
                                  ms.recompute)
    extra = sum(extra_terms.values())
    kept = sum(v for k, v in extra_terms.items() if k in ("embedding_ids", "embedding_dropout_mask",
                                                          "layout_permutation"))
    layers = -(-cfg.num_layers // ms.checkpoint_every) * per_layer if ms.recompute == "full" \
        else cfg.num_layers * per_layer
    host_acts = layers if ms.offload else 0
    layers -= host_acts
    st = _state(cfg, lay, dp, ms, b)
    loss_fwd, loss_bwd = _loss_phases(cfg, lay, ms, b)
    sharded = ms.zero_stage >= 2 and (dp * lay.sp > 1 or ms.offload_optimizer)
    # in forward and at the loss, ZeRO 3 holds the root unit unsharded (ZeRO 2: every unit)
    at_loss = st["work_loss_inside"] if ms.loss_chunk else st["work_loss"]
    layer_grads = st["work_grads"] if sharded else st["layer"] + st["root"]  # the head's and the last layer's
    phases = {  # (stored activations, working bytes, unsharded parameters, gradients) at each moment
        "loss forward": (layers + extra, loss_fwd, at_loss, 0),
        "loss backward": (layers + extra, loss_bwd, at_loss, 0),
        "layer backward": (layers + kept, _layer_backward(cfg, lay, ms, b, attention_kernel, dropout,
                                                         implementation, causal), st["work_layer"], layer_grads),
        "optimizer": (0, _optimizer_work(cfg, lay, dp, ms, b), 0, st["grads"]),
    }
    name, (acts, work, wparams, grads) = max(phases.items(), key=lambda kv: sum(kv[1]))
    return MemoryBreakdown(activations=acts, parameters=st["params"] + wparams, gradients=grads,
                           optimizer=st["optimizer"], activation_per_layer=per_layer, activation_non_layer=extra,
                           transient=work, host=st["host"] + host_acts, peak_phase=name)


def _optimizer_work(cfg: ModelConfig, lay: ParallelLayout, dp: int, ms: MemorySettings, b: _Bytes) -> int:
    """Clipping's float64 square of the largest local gradient, or AdamW's temporaries (about 1.5x the
    local parameters), whichever is larger; none on the device with the optimizer offloaded."""
    if ms.offload_optimizer:
        return 0
    h, d = cfg.hidden_size, cfg.d
    largest = max(math.ceil(cfg.vocab_size / lay.tp) * h, 2 * lay.ffn_tp * h, (lay.heads_tp + 2 * lay.kv_tp) * d * h)
    local = parameter_count(cfg, lay.tp)
    if ms.zero_stage >= 2:
        g = dp * lay.sp
        largest, local = -(-largest // g), -(-local // g)
    return max(16 * largest, 3 * local * b.param // 2)
