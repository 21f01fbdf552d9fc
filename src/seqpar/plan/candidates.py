"""One costed layout (:class:`Candidate`): degrees, memory settings, memory, communication, time, a reason.

:func:`cost` prices a layout with given memory settings; :func:`best_settings` tries the memory
settings a :class:`~seqpar.plan.settings.Settings` leaves open and keeps the fastest that fits
(else the one needing the least memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from seqpar.core.configs import ModelConfig
from seqpar.core.errors import ConfigError
from seqpar.plan.comm_cost import CommVolume, dp_comm_bytes
from seqpar.plan.memory import GB
from seqpar.plan.parallel_layout import ParallelLayout, group_spans_nodes, resolve_parallel_layout
from seqpar.plan.peak import MemoryBreakdown, MemorySettings, peak_memory
from seqpar.plan.settings import Settings
from seqpar.plan.timing import TimeEstimate, estimate_layout_time, layer_transfers_cached

__all__ = ["Candidate", "cost", "best_settings", "padded_length"]


@dataclass
class Candidate:
    """One costed layout.

    Attributes:
        strategy: one of :data:`seqpar.plan.STRATEGIES`.
        tp, sp, dp, ulysses, ring: degrees (``tp*sp*dp`` GPUs; ``ulysses*ring == sp`` for
            Ulysses/ring/USP/ring_qk_av, both 1 for all-gather).
        feasible: the layout is possible for this model (heads, divisibility).
        fits: feasible, the device peak ``memory.total <= gpu_memory_gb`` and the host bytes of a
            node within ``host_memory_gb``.
        reason: why infeasible / not fitting, or what its communication does.
        memory: bytes per GPU at the step's peak (``None`` when infeasible).
        comm: bytes per GPU per layer, forward/backward (``None`` when infeasible).
        dp_comm_bytes: bytes per GPU per step for gradient/parameter sync.
        time: seconds (``None`` when infeasible).
        settings: the memory settings costed (recompute, offload, tiles, loss chunk, ZeRO stage...).
        padded_len: the sequence length the layout runs (padded to what its split needs).
        step_comm_bytes: bytes this GPU sends per step (every layer's and the data-parallel sync).
    """

    strategy: str
    tp: int
    sp: int
    dp: int
    ulysses: int = 1
    ring: int = 1
    feasible: bool = True
    fits: bool = False
    reason: str = ""
    memory: MemoryBreakdown | None = None
    comm: CommVolume | None = None
    dp_comm_bytes: int = 0
    time: TimeEstimate | None = None
    label: str = ""
    settings: MemorySettings = field(default_factory=MemorySettings)
    padded_len: int = 0
    step_comm_bytes: int = 0


    @property
    def degrees(self) -> dict[str, int]:
        return {"tp": self.tp, "sp": self.sp, "dp": self.dp, "ulysses": self.ulysses, "ring": self.ring}

    @property
    def comm_bytes(self) -> int:
        """Bytes per GPU per layer, forward + backward (0 when infeasible)."""
        return self.comm.total if self.comm else 0

    @property
    def step_s(self) -> float | None:
        return self.time.step if self.time else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "strategy": self.strategy, "degrees": self.degrees,
            "feasible": self.feasible, "fits": self.fits, "reason": self.reason,
            "settings": self.settings.to_dict(), "padded_len": self.padded_len,
            "memory": self.memory.to_dict() if self.memory else None,
            "comm_bytes_per_layer": self.comm.to_dict() if self.comm else None,
            "dp_comm_bytes_per_step": self.dp_comm_bytes, "comm_bytes_per_step": self.step_comm_bytes,
            "time": self.time.to_dict() if self.time else None,
        }


def layout_label(strategy: str, tp: int, sp: int, dp: int, u: int, r: int) -> str:
    """``"usp u=2 r=4 tp=2 dp=2"``, ``"megatron tp=8"``, ``"ring sp=8"``..."""
    if strategy == "usp":
        s = f"usp u={u} r={r}"
    elif strategy == "megatron":
        s = f"megatron tp={tp}"
    elif strategy == "none":
        s = "none"
    else:
        s = f"{strategy} sp={sp}"
    if tp > 1 and strategy != "megatron":
        s += f" tp={tp}"
    if dp > 1:
        s += f" dp={dp}"
    return s


def padded_length(seq_len: int, sp: int, tp: int, sequence_parallel: bool) -> int:
    """The length a split runs: ``seqpar.shard`` pads to ``2 sp`` (zigzag) and Megatron SP to a multiple of tp."""
    unit = (2 * sp if sp > 1 else 1) * (tp if sequence_parallel and tp > 1 else 1)
    return -(-seq_len // unit) * unit


def _fmt_s(x: float) -> str:
    """Seconds as a short human string (s, ms or us)."""
    if x >= 1.0:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _where(spans: bool) -> str:
    return "crosses nodes (IB)" if spans else "stays in NVLink"


def explain(lay: ParallelLayout, t: TimeEstimate, st: Settings) -> str:
    """What the layout's communication does, in words (where it runs, what is hidden)."""
    node = st.hardware.node_size
    u, r, tp = lay.ulysses, lay.ring, lay.tp
    parts = []
    if tp > 1:
        kind = "all-gather/reduce-scatter" if lay.sequence_parallel else "all-reduce"
        parts.append(f"tp={tp} {kind} {_where(group_spans_nodes(1, tp, node))}, not overlapped")
    if lay.strategy == "none" and tp == 1:
        parts.append("no model or sequence parallelism: every GPU keeps the whole sequence")
    if lay.strategy in ("ulysses", "usp") and u > 1:
        parts.append(f"all-to-all over u={u} {_where(group_spans_nodes(tp, u, node))}")
    if lay.strategy in ("ring", "usp") and r > 1:
        where = "inter-node" if group_spans_nodes(tp * u, r, node) else "NVLink"
        exposed = t.ring_exposed_forward
        if exposed <= 1e-12:
            parts.append(f"ring over r={r} hides its {where} K/V transfer behind compute")
        else:
            parts.append(f"ring over r={r} cannot fully hide its {where} K/V transfer "
                         f"({_fmt_s(exposed)}/layer exposed)")
    if lay.strategy == "allgather":
        parts.append(f"all-gather of full K/V over {lay.sp} GPUs {_where(group_spans_nodes(tp, lay.sp, node))}, "
                     "not overlapped, full K/V kept")
    if lay.strategy == "ring_qk_av":
        where = "inter-node" if group_spans_nodes(tp, r, node) else "NVLink"
        parts.append(f"two un-overlapped {where} ring passes over {r} GPUs, scores [b, a, s/{r}, s] materialised")
    return "; ".join(parts)


def cost(cfg: ModelConfig, lay: ParallelLayout, dp: int, st: Settings, ms: MemorySettings,
         seq_len: int | None = None) -> Candidate:
    """Price ``lay`` (``dp`` copies) with memory settings ``ms``; ``seq_len`` the real tokens (when padded)."""
    drop = cfg.dropout > 0 if st.dropout is None else bool(st.dropout)
    mem = peak_memory(cfg, lay, dp, ms, dtype_bytes=st.dtype_bytes, param_bytes=st.param_bytes,
                      grad_bytes=st.grad_bytes, optimizer_bytes=st.optimizer_bytes,
                      attention_kernel=st.attention_kernel, dropout=drop, implementation=st.implementation,
                      causal=st.causal)
    trs = list(layer_transfers_cached(cfg, lay, st.dtype_bytes, ms.recompute))
    comm = CommVolume(forward=sum(x.bytes for x in trs if x.phase == "forward"),
                      backward=sum(x.bytes for x in trs if x.phase == "backward"), transfers=trs)
    dpb = dp_comm_bytes(cfg, lay.tp, dp, lay.sp, ms.zero_stage, param_bytes=st.param_bytes, grad_bytes=st.grad_bytes)
    tm = estimate_layout_time(cfg, lay, dp=dp, hardware=st.hardware, dtype_bytes=st.dtype_bytes,
                              attention_kernel=st.attention_kernel, causal=st.causal, dp_bytes=dpb, memory=ms,
                              param_bytes=st.param_bytes, grad_bytes=st.grad_bytes)
    real = seq_len or lay.seq_len
    if real != lay.seq_len:  # padding runs but does not count (the estimate is cached: a new one)
        tm = replace(tm, tokens_per_s=tm.tokens_per_s * real / lay.seq_len, mfu=tm.mfu * real / lay.seq_len)
    per_node = min(st.hardware.node_size, lay.tp * lay.sp * dp)
    host_ok = mem.host * per_node <= st.host_memory_gb * GB
    fits = mem.total <= st.gpu_memory_gb * GB and host_ok
    why = explain(lay, tm, st)
    if real != lay.seq_len:
        why = f"padded to {lay.seq_len}" + (f"; {why}" if why else "")
    if mem.total > st.gpu_memory_gb * GB:
        why = f"needs {mem.total_gb:.1f} GB/GPU > {st.gpu_memory_gb:g} GB" + (f"; {why}" if why else "")
    elif not host_ok:
        why = (f"host memory binds: {mem.host * per_node / GB:.0f} GB offloaded per node > "
               f"{st.host_memory_gb:g} GB" + (f"; {why}" if why else ""))
    return Candidate(strategy=lay.strategy, tp=lay.tp, sp=lay.sp, dp=dp, ulysses=lay.ulysses, ring=lay.ring,
                     feasible=True, fits=fits, reason=why, memory=mem, comm=comm, dp_comm_bytes=dpb, time=tm,
                     label=layout_label(lay.strategy, lay.tp, lay.sp, dp, lay.ulysses, lay.ring), settings=ms,
                     padded_len=lay.seq_len, step_comm_bytes=cfg.num_layers * comm.total + dpb)


def _simplicity(ms: MemorySettings) -> int:
    """How many settings are on (ties go to the simpler run)."""
    return sum([ms.recompute != "none", ms.offload, ms.checkpoint_every > 1, ms.mlp_tiles > 1, ms.loss_chunk > 0,
                ms.zero_stage > 0, ms.offload_optimizer])


def sort_key(c: Candidate) -> tuple:
    """Fitting first, fastest first; ties to the layout that communicates less, then the simpler settings,
    then less memory.  Then what does not fit, smallest first; then the infeasible."""
    if c.fits and c.time is not None and c.memory is not None:
        return (0, -round(c.time.tokens_per_s, 6), c.step_comm_bytes, _simplicity(c.settings), c.memory.total)
    if c.feasible and c.memory is not None:
        return (1, c.memory.total, _simplicity(c.settings), 0.0, 0)
    return (2, 0, 0, 0.0, 0)


def best_settings(cfg: ModelConfig, seq_len: int, strategy: str, tp: int, sp: int, dp: int, ulysses: int | None,
                  st: Settings, *, thrifty: bool = False, fixed: MemorySettings | None = None) -> Candidate:
    """The layout priced with each memory setting ``st`` leaves open; the best by :func:`sort_key`.

    An impossible layout comes back with ``feasible=False`` and the reason.  ``fixed``: price only
    these settings; ``thrifty``: only the most memory-saving combinations.
    """
    padded = padded_length(seq_len, sp, tp, st.sequence_parallel)
    try:
        lay = resolve_parallel_layout(cfg, padded, st.micro_batch, strategy=strategy, tp=tp, sp=sp, ulysses=ulysses,
                                      sequence_parallel=st.sequence_parallel)
    except ConfigError as e:
        if strategy == "usp":
            u = ulysses or 1
            r = sp // u if sp % u == 0 else 1
        else:
            u, r = (sp, 1) if strategy == "ulysses" else ((1, sp) if strategy in ("ring", "ring_qk_av") else (1, 1))
        return Candidate(strategy=strategy, tp=tp, sp=sp, dp=dp, ulysses=u, ring=r, feasible=False, fits=False,
                         reason=str(e), label=layout_label(strategy, tp, sp, dp, u, r), padded_len=padded)
    options = [fixed] if fixed is not None else st.memory_options(lay, thrifty=thrifty)
    if len(options) == 1:
        return cost(cfg, lay, dp, st, options[0], seq_len)
    # the fastest settings first (time is cheap to estimate, memory less so): the first that fits wins,
    # unless another with the same speed, traffic and simplicity needs less memory
    timed = sorted(options, key=lambda ms: _speed_key(cfg, lay, dp, st, ms))
    best: Candidate | None = None
    for ms in timed:
        if best is not None and best.fits and _speed_key(cfg, lay, dp, st, ms) != _speed_key(cfg, lay, dp, st,
                                                                                               best.settings):
            return best
        c = cost(cfg, lay, dp, st, ms, seq_len)
        if best is None or sort_key(c) < sort_key(best):
            best = c
    return best if best is not None else cost(cfg, lay, dp, st, options[0], seq_len)


def _speed_key(cfg: ModelConfig, lay: ParallelLayout, dp: int, st: Settings, ms: MemorySettings) -> tuple:
    """:func:`sort_key`'s order among settings that fit: faster, less traffic, simpler."""
    dpb = dp_comm_bytes(cfg, lay.tp, dp, lay.sp, ms.zero_stage, param_bytes=st.param_bytes, grad_bytes=st.grad_bytes)
    tm = estimate_layout_time(cfg, lay, dp=dp, hardware=st.hardware, dtype_bytes=st.dtype_bytes,
                              attention_kernel=st.attention_kernel, causal=st.causal, dp_bytes=dpb, memory=ms,
                              param_bytes=st.param_bytes, grad_bytes=st.grad_bytes)
    traffic = cfg.num_layers * sum(x.bytes for x in layer_transfers_cached(cfg, lay, st.dtype_bytes, ms.recompute))
    return (-round(tm.tokens_per_s, 6), traffic + dpb, _simplicity(ms))
