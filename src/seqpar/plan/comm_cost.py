"""Communication volume per layer per GPU (bytes each GPU sends).

Collective cost models (bandwidth term of the ring algorithms, Thakur et
al. 2005; Chan et al. 2007), ``n`` ranks:

* all-gather / reduce-scatter: ``(n-1)/n`` of the *full* (gathered) tensor;
* all-reduce: ``2 (n-1)/n`` of the full tensor (reduce-scatter + all-gather);
* all-to-all: ``(n-1)/n`` of the *local* tensor;
* point-to-point ring step: the whole block.

Per strategy, with ``p`` bytes per element, ``s_l = s/sp`` local tokens,
``a_t = a/tp`` heads and ``kv_t`` kv heads per tensor-parallel rank:

``megatron`` (tp ``t``, sequence parallel): forward 2 all-gathers + 2
    reduce-scatters of ``[s_l, b, h]``; backward their conjugates (2 RS + 2 AG)
    plus the 2 all-gathers that re-gather the sequence-sharded input for the
    weight gradients (Megatron-LM does this because only the shard is stored).
    Without sequence parallelism: 2 all-reduces forward, 2 backward.
    These tensor-parallel collectives are added to any sp strategy with tp > 1.
``ulysses`` (``u``): forward 4 all-to-alls (q, k, v before attention, o after),
    each ``(u-1)/u`` of the local ``[b, s_l, heads, d]``; k and v at kv-head
    size (GQA), expanded to ``u`` heads first when ``kv_t < u``. Backward: the
    same four for dO, dQ, dK, dV.
``ring`` (``r``): forward ``r-1`` K/V block transfers of ``[b, s/r, kv, d]``
    (K and V at kv-head size). Backward: ``r-1`` K/V transfers plus ``r`` dK/dV
    transfers (the accumulated block gradients travel a full circle back to
    their owner, as in ring-flash-attention). Sent in ``p``-byte elements;
    implementations that accumulate dK/dV in fp32 send twice that part.
``ring_qk_av`` (Li et al. 2021): forward ``r-1`` K transfers (``QK^T`` pass)
    then ``r-1`` V transfers (``AV`` pass); backward as ``ring``.
``allgather`` (``g = sp``): forward all-gather of K and V (``(g-1)/g`` of the
    full ``[b, s, kv, d]``); backward reduce-scatter of dK and dV.
``usp`` (``u x r``): the Ulysses all-to-alls over ``u`` on ``[b, s/sp, ...]``,
    then the ring over ``r`` with blocks ``[b, s/r, kv/u, d]``.

Recomputation replays forward communication in backward: ``full`` replays
every forward collective; ``selective`` replays the ``QK^T`` K pass of
``ring_qk_av`` (its scores were dropped) and nothing else (Ulysses and
all-gather keep their gathered q/k/v; ring already recomputes blockwise).

Data-parallel traffic per step (:func:`dp_comm_bytes`), over the ``dp*sp``
gradient group: ZeRO 0 all-reduces gradients; ZeRO 1/2 reduce-scatter
gradients and all-gather updated parameters; ZeRO 3 all-gathers parameters
in forward and in backward and reduce-scatters gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seqpar.core.configs import ModelConfig, ModelLike, get_config
from seqpar.core.errors import ConfigError, check
from seqpar.plan.memory import parameter_count
from seqpar.plan.parallel_layout import RECOMPUTE_MODES, ParallelLayout, resolve_parallel_layout

__all__ = [
    "Transfer", "CommVolume", "comm_volume_per_layer", "layer_transfers", "dp_comm_bytes",
    "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes", "all_to_all_bytes",
]


def _frac(x: int, n: int) -> int:
    """``(n-1)/n * x`` rounded up to a whole byte."""
    return -(-(n - 1) * x // n)


def all_gather_bytes(full_bytes: int, n: int) -> int:
    """Bytes each rank sends in a ring all-gather producing ``full_bytes``."""
    return _frac(full_bytes, n)


def reduce_scatter_bytes(full_bytes: int, n: int) -> int:
    """Bytes each rank sends in a ring reduce-scatter of a ``full_bytes`` input."""
    return _frac(full_bytes, n)


def all_reduce_bytes(full_bytes: int, n: int) -> int:
    """Bytes each rank sends in a ring all-reduce (reduce-scatter + all-gather)."""
    return 2 * _frac(full_bytes, n)


def all_to_all_bytes(local_bytes: int, n: int) -> int:
    """Bytes each rank sends in an all-to-all of its ``local_bytes`` tensor."""
    return _frac(local_bytes, n)


@dataclass
class Transfer:
    """One communication item of a layer on one GPU.

    Attributes:
        name: what moves (``"all-to-all q"``, ``"ring K/V blocks"``, ...).
        phase: ``"forward"`` or ``"backward"``.
        group: ``"tp"``, ``"ulysses"``, ``"ring"``, ``"sp"`` (all-gather group).
        group_size: ranks in the group.
        bytes: bytes this GPU sends for the item (all steps together).
        steps: point-to-point steps (ring) or 1 for a collective.
        overlapped: ring transfers, hidden behind block compute when possible.
    """

    name: str
    phase: str
    group: str
    group_size: int
    bytes: int
    steps: int = 1
    overlapped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CommVolume:
    """Bytes one GPU sends for one layer, forward and backward."""

    forward: int
    backward: int
    transfers: list[Transfer] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def by_group(self) -> dict[str, int]:
        """Forward + backward bytes per group name."""
        out: dict[str, int] = {}
        for t in self.transfers:
            out[t.group] = out.get(t.group, 0) + t.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "total": self.total,
                "by_group": self.by_group(), "transfers": [t.to_dict() for t in self.transfers]}


def layer_transfers(cfg: ModelConfig, lay: ParallelLayout, dtype_bytes: int = 2,
                    recompute: str = "none") -> list[Transfer]:
    """Every transfer of one layer on one GPU (see module docstring)."""
    check(recompute in RECOMPUTE_MODES, ConfigError,
          f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    p, b, d, h = dtype_bytes, lay.micro_batch, cfg.d, cfg.hidden_size
    fwd: list[Transfer] = []
    bwd: list[Transfer] = []
    t = lay.tp
    if t > 1:
        x = p * b * lay.s_local * h  # full [s/sp, b, h] of the tp group
        if lay.sequence_parallel:
            fwd += [Transfer("tp all-gather [s,b,h]", "forward", "tp", t, 2 * all_gather_bytes(x, t), 2),
                    Transfer("tp reduce-scatter [s,b,h]", "forward", "tp", t, 2 * reduce_scatter_bytes(x, t), 2)]
            bwd += [Transfer("tp reduce-scatter [s,b,h] (grad of all-gather)", "backward", "tp", t,
                             2 * reduce_scatter_bytes(x, t), 2),
                    Transfer("tp all-gather [s,b,h] (grad of reduce-scatter)", "backward", "tp", t,
                             2 * all_gather_bytes(x, t), 2),
                    Transfer("tp all-gather [s,b,h] (re-gather input for weight grads)", "backward", "tp", t,
                             2 * all_gather_bytes(x, t), 2)]
        else:
            fwd.append(Transfer("tp all-reduce [s,b,h]", "forward", "tp", t, 2 * all_reduce_bytes(x, t), 2))
            bwd.append(Transfer("tp all-reduce [s,b,h]", "backward", "tp", t, 2 * all_reduce_bytes(x, t), 2))

    st, u, r = lay.strategy, lay.ulysses, lay.ring
    if st in ("ulysses", "usp") and u > 1:
        q_local = p * b * lay.s_local * lay.heads_tp * d
        kv_heads_sent = lay.kv_tp if lay.kv_tp % u == 0 else u  # expanded to one kv head per rank
        kv_local = p * b * lay.s_local * kv_heads_sent * d
        for nm, size in (("q", q_local), ("k", kv_local), ("v", kv_local), ("o", q_local)):
            fwd.append(Transfer(f"all-to-all {nm}", "forward", "ulysses", u, all_to_all_bytes(size, u)))
        for nm, size in (("dO", q_local), ("dQ", q_local), ("dK", kv_local), ("dV", kv_local)):
            bwd.append(Transfer(f"all-to-all {nm}", "backward", "ulysses", u, all_to_all_bytes(size, u)))
    if st in ("ring", "usp", "ring_qk_av") and r > 1:
        blk = p * b * lay.ring_block_tokens * lay.kv_attn * d  # one K (or V) block
        if st == "ring_qk_av":
            fwd += [Transfer("ring K blocks (QK^T pass)", "forward", "ring", r, (r - 1) * blk, r - 1),
                    Transfer("ring V blocks (AV pass)", "forward", "ring", r, (r - 1) * blk, r - 1)]
        else:
            fwd.append(Transfer("ring K/V blocks", "forward", "ring", r, (r - 1) * 2 * blk, r - 1, True))
        ov = st != "ring_qk_av"
        bwd += [Transfer("ring K/V blocks", "backward", "ring", r, (r - 1) * 2 * blk, r - 1, ov),
                Transfer("ring dK/dV blocks", "backward", "ring", r, r * 2 * blk, r, ov)]
        if st == "ring_qk_av" and recompute == "selective":
            bwd.append(Transfer("ring K blocks (recompute QK^T)", "backward", "ring", r, (r - 1) * blk, r - 1))
    if st == "allgather" and lay.sp > 1:
        g = lay.sp
        kv_full = p * b * lay.seq_len * lay.kv_tp * d
        fwd += [Transfer("all-gather K", "forward", "sp", g, all_gather_bytes(kv_full, g)),
                Transfer("all-gather V", "forward", "sp", g, all_gather_bytes(kv_full, g))]
        bwd += [Transfer("reduce-scatter dK", "backward", "sp", g, reduce_scatter_bytes(kv_full, g)),
                Transfer("reduce-scatter dV", "backward", "sp", g, reduce_scatter_bytes(kv_full, g))]
    if recompute == "full":
        bwd += [Transfer(tr.name + " (recompute)", "backward", tr.group, tr.group_size, tr.bytes, tr.steps,
                         tr.overlapped) for tr in fwd]
    return fwd + bwd


def comm_volume_per_layer(
    cfg: ModelLike, seq_len: int, micro_batch: int = 1, strategy: str | None = None, tp: int = 1,
    sp: int = 1, *, ulysses: int | None = None, sequence_parallel: bool = True, dtype_bytes: int = 2,
    recompute: str = "none",
) -> CommVolume:
    """Bytes one GPU sends for one layer, forward and backward, by strategy.

    ``strategy="megatron"`` (or any strategy with ``tp > 1``) includes the
    tensor-parallel collectives; ``sequence_parallel`` picks all-gather /
    reduce-scatter (Megatron SP) or all-reduce for them. See the module
    docstring for the per-strategy formulas.
    """
    c = get_config(cfg)
    lay = resolve_parallel_layout(c, seq_len, micro_batch, strategy=strategy, tp=tp, sp=sp, ulysses=ulysses,
                         sequence_parallel=sequence_parallel)
    trs = layer_transfers(c, lay, dtype_bytes, recompute)
    return CommVolume(
        forward=sum(x.bytes for x in trs if x.phase == "forward"),
        backward=sum(x.bytes for x in trs if x.phase == "backward"),
        transfers=trs,
    )


def dp_comm_bytes(model: ModelLike, tp: int = 1, dp: int = 1, sp: int = 1, zero_stage: int = 0, *,
                  param_bytes: int = 2, grad_bytes: int = 2) -> int:
    """Bytes one GPU sends per optimizer step for gradient/parameter sync.

    Group: the ``g = dp * sp`` ranks holding the same weight shard. ZeRO 0:
    all-reduce of the gradients, ``2 (g-1)/g * N * grad_bytes``; ZeRO 1/2:
    reduce-scatter of gradients + all-gather of parameters; ZeRO 3: two
    parameter all-gathers (forward, backward) + a gradient reduce-scatter.
    ``N`` is :func:`parameter_count` of one tensor-parallel rank.
    """
    check(zero_stage in (0, 1, 2, 3), ConfigError, f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    g = dp * sp
    if g == 1:
        return 0
    n = parameter_count(model, tp)
    if zero_stage == 0:
        return all_reduce_bytes(n * grad_bytes, g)
    ag = all_gather_bytes(n * param_bytes, g)
    rs = reduce_scatter_bytes(n * grad_bytes, g)
    return rs + ag * (2 if zero_stage == 3 else 1)
