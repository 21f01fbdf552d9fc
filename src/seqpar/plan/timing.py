"""Time estimate of one training step (one micro-batch, forward + backward).

FLOPs per layer, forward, whole sequence (multiply-add = 2 FLOPs):

* matmuls: ``2*b*s*(h*a*d + 2*h*kv*d + a*d*h + n*h*f)`` with ``n = 3`` for
  SwiGLU, ``2`` for GELU (Narayanan et al. 2021 count ``24*b*s*h^2`` for
  ``f = 4h``, no GQA: the same number);
* attention: ``QK^T`` and ``AV``, ``4*b*s^2*a*d``, halved when causal
  (load-balanced layouts, e.g. zig-zag ring, are assumed).

Backward is twice the forward for matmuls; attention backward is 2x the
forward with the ``math`` kernel and 2.5x with ``flash`` (it recomputes the
scores). Selective recompute adds one attention forward (``math`` only, as
flash already recomputes); full recompute adds the whole forward and replays
its communication. Per GPU, FLOPs are divided by ``tp * sp``. The output
projection adds ``2*b*s*h*v`` forward (x3 for forward + backward).

Compute runs at ``peak_tflops * utilization``. A collective runs at the
intra-node bandwidth (NVLink, default 450 GB/s per direction) when its group
fits in a node and at the inter-node bandwidth (InfiniBand, default 50 GB/s
per GPU) otherwise; time = bytes sent per GPU / bandwidth (no latency term).
Tensor-parallel, Ulysses, all-gather and ``ring_qk_av`` communication is not
overlapped (added). Ring and USP ring steps overlap transfer and block
compute: ``sum over steps of max(block compute, block transfer)``.
Data-parallel sync overlaps with backward compute; only the excess counts.

Memory settings (:class:`seqpar.plan.peak.MemorySettings`): tiled MLPs replay the MLP's
forward in backward (one more MLP forward per layer, twice with ``recompute="full"``, whose replay
runs the tiled MLP's forward again); the chunked loss recomputes the logits (the head costs 4x its
forward instead of 3x); ``offload`` copies each checkpoint to host memory and back over PCIe
(``pcie_gbps``) on a side stream, hidden behind the layer's compute (only the excess counts);
``offload_optimizer`` moves the sharded parameters in and the sharded gradients out every step
over PCIe and runs AdamW on the CPU (``cpu_adam_gparams`` billion parameters per second per GPU),
not overlapped.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from seqpar.core.configs import ModelConfig
from seqpar.core.errors import ConfigError, check
from seqpar.plan.comm_cost import Transfer, layer_transfers
from seqpar.plan.memory import parameter_count
from seqpar.plan.parallel_layout import ParallelLayout, group_spans_nodes
from seqpar.plan.peak import MemorySettings

__all__ = ["Hardware", "TimeEstimate", "layer_flops", "estimate_layout_time", "ring_time", "layer_transfers_cached"]


@dataclass(frozen=True)
class Hardware:
    """GPU and network model.

    Attributes:
        peak_tflops: dense bf16 peak, TFLOP/s (H100 SXM: 989).
        utilization: fraction of peak the kernels reach (0-1].
        nvlink_gbps: intra-node bandwidth per GPU per direction, GB/s (1e9 B/s).
        ib_gbps: inter-node bandwidth per GPU, GB/s.
        node_size: GPUs per node.
        pcie_gbps: host <-> GPU bandwidth per GPU, GB/s (PCIe 5 x16: about 50 in practice).
        cpu_adam_gparams: AdamW on the CPU, billion parameters per second per GPU's share of the host
            (an estimate; DeepSpeed's vectorised CPU Adam reaches a few per node).
    """

    peak_tflops: float = 989.0
    utilization: float = 0.5
    nvlink_gbps: float = 450.0
    ib_gbps: float = 50.0
    node_size: int = 8
    pcie_gbps: float = 50.0
    cpu_adam_gparams: float = 0.5

    def __post_init__(self) -> None:
        check(self.peak_tflops > 0, ConfigError, f"peak_tflops must be > 0, got {self.peak_tflops}")
        check(0 < self.utilization <= 1, ConfigError, f"utilization must be in (0, 1], got {self.utilization}")
        check(self.nvlink_gbps > 0 and self.ib_gbps > 0 and self.pcie_gbps > 0 and self.cpu_adam_gparams > 0,
              ConfigError, "bandwidths and the CPU optimizer's speed must be > 0")
        check(isinstance(self.node_size, int) and self.node_size > 0, ConfigError,
              f"node_size must be a positive int, got {self.node_size!r}")

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.utilization

    def bandwidth(self, spans_nodes: bool) -> float:
        """Bytes per second of a collective whose group does / does not span nodes."""
        return (self.ib_gbps if spans_nodes else self.nvlink_gbps) * 1e9


def layer_flops(cfg: ModelConfig, seq_len: int, micro_batch: int = 1, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs of one layer for the whole sequence: ``matmul`` (``mlp`` of it) and ``attention``."""
    b, s, h, d, a, kv, f = (micro_batch, seq_len, cfg.hidden_size, cfg.d, cfg.num_attention_heads,
                            cfg.kv_heads, cfg.ffn_hidden_size)
    n_mat = 3 if cfg.mlp == "swiglu" else 2
    matmul = 2.0 * b * s * (h * a * d + 2 * h * kv * d + a * d * h + n_mat * h * f)
    attention = 4.0 * b * s * s * a * d * (0.5 if causal else 1.0)
    return {"matmul": matmul, "attention": attention, "mlp": 2.0 * b * s * n_mat * h * f}


@dataclass
class TimeEstimate:
    """Seconds, per GPU. Per-layer entries are for one layer.

    Attributes:
        compute_forward, compute_backward: per-layer compute time (backward
            includes recomputation).
        comm_forward, comm_backward: per-layer communication time that is not
            hidden behind compute.
        layer_forward, layer_backward: per-layer wall time.
        head: embedding/output layer, forward + backward.
        dp_exposed: data-parallel sync not hidden behind backward.
        step: ``L*(layer_forward + layer_backward) + head + dp_exposed``.
        tokens_per_s: ``dp * b * s / step``, whole cluster.
        mfu: model FLOPs (no recompute) / (GPUs * peak * step).
        ring_exposed_forward, ring_exposed_backward: per-layer ring transfer
            time not hidden behind block compute (included in ``comm_*``).
    """

    compute_forward: float
    compute_backward: float
    comm_forward: float
    comm_backward: float
    layer_forward: float
    layer_backward: float
    head: float
    dp_exposed: float
    step: float
    tokens_per_s: float
    mfu: float
    ring_exposed_forward: float = 0.0
    ring_exposed_backward: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: float(v) for k, v in self.__dict__.items()}


def ring_time(steps: int, compute: float, kv_xfer: float, grad_xfer: float = 0.0) -> float:
    """``sum_i max(block compute, block transfer)`` over ``steps`` ring steps.

    K/V blocks move on every step but the last; gradient blocks (backward)
    move on every step.
    """
    c = compute / steps
    return sum(max(c, (kv_xfer if i < steps - 1 else 0.0) + grad_xfer) for i in range(steps))


def _host_traffic(cfg: ModelConfig, lay: ParallelLayout, dp: int, ms: MemorySettings, hw: Hardware,
                  dtype_bytes: int, param_bytes: int, grad_bytes: int) -> tuple[float, float, float]:
    """Seconds over PCIe: a checkpoint each way per layer (offload), and per step the sharded weights in
    (each all-gather), the gradients out and AdamW on the CPU (offload_optimizer)."""
    ckpt = dtype_bytes * lay.micro_batch * lay.s_replicated * cfg.hidden_size / (hw.pcie_gbps * 1e9)
    state = 0.0
    if ms.offload_optimizer:
        local = -(-parameter_count(cfg, lay.tp) // (dp * lay.sp))
        moved = local * (param_bytes * (2 if ms.zero_stage == 3 else 1) + grad_bytes)
        state = moved / (hw.pcie_gbps * 1e9) + local / (hw.cpu_adam_gparams * 1e9)
    return (ckpt, ckpt, state) if ms.offload else (0.0, 0.0, state)


@functools.lru_cache(maxsize=16384)
def layer_transfers_cached(cfg: ModelConfig, lay: ParallelLayout, dtype_bytes: int, recompute: str
                           ) -> tuple[Transfer, ...]:
    """:func:`seqpar.plan.comm_cost.layer_transfers`, remembered (the planner asks for the same ones often)."""
    return tuple(layer_transfers(cfg, lay, dtype_bytes, recompute))


@functools.lru_cache(maxsize=65536)
def estimate_layout_time(
    cfg: ModelConfig, lay: ParallelLayout, *, dp: int = 1, hardware: Hardware = Hardware(), dtype_bytes: int = 2,
    recompute: str = "none", attention_kernel: str = "math", causal: bool = True,
    dp_bytes: int = 0, memory: MemorySettings | None = None, param_bytes: int = 2, grad_bytes: int = 2,
) -> TimeEstimate:
    """Step-time estimate of a resolved layout (see module docstring).

    ``memory`` (its ``recompute`` replaces ``recompute``) adds what tiles, the chunked loss and the
    offloads cost; ``param_bytes``/``grad_bytes`` size what ``offload_optimizer`` moves.
    """
    hw = hardware
    ms = memory if memory is not None else MemorySettings(recompute=recompute)
    recompute = ms.recompute
    n_par = lay.tp * lay.sp
    fl = layer_flops(cfg, lay.seq_len, lay.micro_batch, causal)
    mm_f = fl["matmul"] / n_par
    at_f = fl["attention"] / n_par
    at_b = at_f * (2.5 if attention_kernel == "flash" else 2.0)
    mm_b = 2 * mm_f
    if recompute == "selective" and attention_kernel == "math":
        at_b += at_f
    if recompute == "full":
        mm_b += mm_f
        at_b += at_f
    if ms.mlp_tiles > 1:  # the tiled MLP replays its forward in backward (again inside a full replay)
        mm_b += fl["mlp"] / n_par * (2 if recompute == "full" else 1)
    speed = hw.flops_per_s
    trs = layer_transfers_cached(cfg, lay, dtype_bytes, recompute)

    strides = {"tp": 1, "ulysses": lay.tp, "ring": lay.tp * lay.ulysses, "sp": lay.tp}

    def xfer_time(tr: Transfer) -> float:
        spans = group_spans_nodes(strides[tr.group], tr.group_size, hw.node_size)
        return tr.bytes / hw.bandwidth(spans)

    exposed_f = sum(xfer_time(x) for x in trs if x.phase == "forward" and not x.overlapped)
    exposed_b = sum(xfer_time(x) for x in trs if x.phase == "backward" and not x.overlapped)
    attn_f_time = at_f / speed
    attn_b_time = at_b / speed
    ring_extra_f = ring_extra_b = 0.0
    if any(x.overlapped for x in trs):
        r = lay.ring
        bw = hw.bandwidth(group_spans_nodes(strides["ring"], r, hw.node_size))
        blk = dtype_bytes * lay.micro_batch * lay.ring_block_tokens * lay.kv_attn * cfg.d
        kv_x, dkv_x = 2 * blk / bw, 2 * blk / bw
        ring_f = ring_time(r, attn_f_time, kv_x)
        ring_b = ring_time(r, at_b / speed - (at_f / speed if recompute == "full" else 0.0), kv_x, dkv_x)
        if recompute == "full":  # the replayed forward runs its own ring pass
            ring_b += ring_f
        ring_extra_f = ring_f - attn_f_time
        ring_extra_b = ring_b - attn_b_time
    comp_f = mm_f / speed + attn_f_time
    comp_b = mm_b / speed + attn_b_time
    comm_f = exposed_f + ring_extra_f
    comm_b = exposed_b + ring_extra_b
    off_f, off_b, off_state = _host_traffic(cfg, lay, dp, ms, hw, dtype_bytes, param_bytes, grad_bytes)
    comm_f += max(0.0, off_f - comp_f)  # checkpoints copied behind the layer's compute
    comm_b += max(0.0, off_b - comp_b)
    layer_f, layer_b = comp_f + comm_f, comp_b + comm_b
    head_flops = 2.0 * lay.micro_batch * lay.seq_len * cfg.hidden_size * cfg.vocab_size / n_par
    head = (4 if ms.loss_chunk else 3) * head_flops / speed
    L = cfg.num_layers
    n_sync = dp * lay.sp
    dp_time = 0.0
    if dp_bytes:
        dp_time = dp_bytes / hw.bandwidth(group_spans_nodes(lay.tp, n_sync, hw.node_size))
    dp_exposed = max(0.0, dp_time - L * comp_b - 2 * head / 3) + off_state
    step = L * (layer_f + layer_b) + head + dp_exposed
    useful = 3 * (L * (fl["matmul"] + fl["attention"]) + head_flops * n_par)
    n_gpus = n_par * dp
    return TimeEstimate(
        compute_forward=comp_f, compute_backward=comp_b, comm_forward=comm_f, comm_backward=comm_b,
        layer_forward=layer_f, layer_backward=layer_b, head=head, dp_exposed=dp_exposed, step=step,
        tokens_per_s=dp * lay.micro_batch * lay.seq_len / step,
        mfu=useful * dp / (n_gpus * hw.peak_tflops * 1e12 * step),
        ring_exposed_forward=ring_extra_f, ring_exposed_backward=ring_extra_b,
    )
