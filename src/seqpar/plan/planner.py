"""Enumerate parallel layouts, cost them, and recommend the fastest that fits.

:func:`evaluate` costs one layout; :func:`plan` enumerates every layout of
``n_gpus`` GPUs (tensor parallel ``tp`` in the divisors of the node size up
to the head count, sequence parallel ``sp`` over each strategy, and for USP
every split ``u x r`` of ``sp``, data parallel ``dp`` for the rest), drops
those that do not fit in memory and recommends the one with the highest
cluster throughput (tokens/s; equal to the shortest step when ``dp`` is
equal).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from seqpar.core.configs import ModelConfig, ModelLike, get_config
from seqpar.core.errors import ConfigError, check
from seqpar.plan.comm_cost import CommVolume, dp_comm_bytes, layer_transfers
from seqpar.plan.implementation import IMPLEMENTATIONS
from seqpar.plan.memory import GB, MemoryBreakdown, _non_layer_terms, _terms, model_state_memory
from seqpar.plan.parallel_layout import (
    ATTENTION_KERNELS,
    RECOMPUTE_MODES,
    SP_STRATEGIES,
    STRATEGIES,
    ParallelLayout,
    divisors,
    group_spans_nodes,
    resolve_parallel_layout,
)
from seqpar.plan.timing import Hardware, TimeEstimate, estimate_layout_time

__all__ = ["Candidate", "Plan", "Settings", "evaluate", "plan"]


@dataclass(frozen=True)
class Settings:
    """Everything besides the layout that the cost model needs."""

    micro_batch: int = 1
    gpu_memory_gb: float = 80.0
    sequence_parallel: bool = True
    dtype_bytes: int = 2
    recompute: str = "selective"
    attention_kernel: str = "math"
    dropout: bool | None = None
    causal: bool = True
    zero_stage: int = 1
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12
    hardware: Hardware = field(default_factory=Hardware)
    implementation: str = "paper"

    def __post_init__(self) -> None:
        check(self.recompute in RECOMPUTE_MODES, ConfigError,
              f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        check(self.attention_kernel in ATTENTION_KERNELS, ConfigError,
              f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
        check(self.implementation in IMPLEMENTATIONS, ConfigError,
              f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        check(self.zero_stage in (0, 1, 2, 3), ConfigError, f"zero_stage must be 0-3, got {self.zero_stage!r}")
        check(self.gpu_memory_gb > 0, ConfigError, f"gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        check(isinstance(self.micro_batch, int) and self.micro_batch > 0, ConfigError,
              f"micro_batch must be a positive int, got {self.micro_batch!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "hardware"}
        d.update(self.hardware.__dict__)
        return d


@dataclass
class Candidate:
    """One costed layout.

    Attributes:
        strategy: one of :data:`STRATEGIES`.
        tp, sp, dp, ulysses, ring: degrees (``tp*sp*dp`` GPUs; ``ulysses*ring
            == sp`` for Ulysses/ring/USP/ring_qk_av, both 1 for all-gather).
        feasible: the layout is possible for this model (heads, divisibility).
        fits: feasible and ``memory.total <= gpu_memory_gb``.
        reason: why infeasible / not fitting, or what its communication does.
        memory: bytes per GPU (``None`` when infeasible).
        comm: bytes per GPU per layer, forward/backward (``None`` when infeasible).
        dp_comm_bytes: bytes per GPU per step for gradient/parameter sync.
        time: seconds (``None`` when infeasible).
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
            "memory": self.memory.to_dict() if self.memory else None,
            "comm_bytes_per_layer": self.comm.to_dict() if self.comm else None,
            "dp_comm_bytes_per_step": self.dp_comm_bytes,
            "time": self.time.to_dict() if self.time else None,
        }


def _label(strategy: str, tp: int, sp: int, dp: int, u: int, r: int) -> str:
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


def _fmt_s(x: float) -> str:
    """Seconds as a short human string (s, ms or us)."""
    if x >= 1.0:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _where(spans: bool) -> str:
    return "crosses nodes (IB)" if spans else "stays in NVLink"


def _explain(cfg: ModelConfig, lay: ParallelLayout, t: TimeEstimate, st: Settings) -> str:
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
        spans = group_spans_nodes(tp * u, r, node)
        where = "inter-node" if spans else "NVLink"
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


def _cost(cfg: ModelConfig, lay: ParallelLayout, dp: int, st: Settings) -> Candidate:
    drop = cfg.dropout > 0 if st.dropout is None else bool(st.dropout)
    per_layer = sum(_terms(cfg, lay, st.recompute, st.dtype_bytes, st.attention_kernel, drop, st.implementation,
                           st.causal).values())
    extra = sum(_non_layer_terms(cfg, lay, st.dtype_bytes, drop, st.implementation, st.causal).values())
    ms = model_state_memory(cfg, lay.tp, dp, lay.sp, st.zero_stage, param_bytes=st.param_bytes,
                            grad_bytes=st.grad_bytes, optimizer_bytes=st.optimizer_bytes)
    mem = MemoryBreakdown(activations=cfg.num_layers * per_layer + extra, parameters=ms["parameters"],
                          gradients=ms["gradients"], optimizer=ms["optimizer"],
                          activation_per_layer=per_layer, activation_non_layer=extra)
    trs = layer_transfers(cfg, lay, st.dtype_bytes, st.recompute)
    comm = CommVolume(forward=sum(x.bytes for x in trs if x.phase == "forward"),
                      backward=sum(x.bytes for x in trs if x.phase == "backward"), transfers=trs)
    dpb = dp_comm_bytes(cfg, lay.tp, dp, lay.sp, st.zero_stage, param_bytes=st.param_bytes,
                        grad_bytes=st.grad_bytes)
    tm = estimate_layout_time(cfg, lay, dp=dp, hardware=st.hardware, dtype_bytes=st.dtype_bytes,
                              recompute=st.recompute, attention_kernel=st.attention_kernel, causal=st.causal,
                              dp_bytes=dpb)
    fits = mem.total <= st.gpu_memory_gb * GB
    why = _explain(cfg, lay, tm, st)
    if not fits:
        why = f"needs {mem.total_gb:.1f} GB/GPU > {st.gpu_memory_gb:g} GB" + (f"; {why}" if why else "")
    return Candidate(strategy=lay.strategy, tp=lay.tp, sp=lay.sp, dp=dp, ulysses=lay.ulysses, ring=lay.ring,
                     feasible=True, fits=fits, reason=why, memory=mem, comm=comm, dp_comm_bytes=dpb, time=tm,
                     label=_label(lay.strategy, lay.tp, lay.sp, dp, lay.ulysses, lay.ring))


def _candidate(cfg: ModelConfig, seq_len: int, strategy: str, tp: int, sp: int, dp: int, ulysses: int | None,
               st: Settings) -> Candidate:
    try:
        lay = resolve_parallel_layout(cfg, seq_len, st.micro_batch, strategy=strategy, tp=tp, sp=sp, ulysses=ulysses,
                             sequence_parallel=st.sequence_parallel)
    except ConfigError as e:
        if strategy == "usp":
            u = ulysses or 1
            r = sp // u if u and sp % u == 0 else 1
        elif strategy == "ulysses":
            u, r = sp, 1
        elif strategy in ("ring", "ring_qk_av"):
            u, r = 1, sp
        else:
            u, r = 1, 1
        return Candidate(strategy=strategy, tp=tp, sp=sp, dp=dp, ulysses=u, ring=r, feasible=False, fits=False,
                         reason=str(e), label=_label(strategy, tp, sp, dp, u, r))
    return _cost(cfg, lay, dp, st)


def _settings(micro_batch: int, gpu_memory_gb: float, sequence_parallel: bool, dtype_bytes: int, recompute: str,
              attention_kernel: str, dropout: bool | None, causal: bool, zero_stage: int, param_bytes: int,
              grad_bytes: int, optimizer_bytes: int, node_size: int, nvlink_gbps: float, ib_gbps: float,
              peak_tflops: float, utilization: float, implementation: str = "paper") -> Settings:
    return Settings(micro_batch=micro_batch, gpu_memory_gb=gpu_memory_gb, sequence_parallel=sequence_parallel,
                    dtype_bytes=dtype_bytes, recompute=recompute, attention_kernel=attention_kernel,
                    dropout=dropout, causal=causal, zero_stage=zero_stage, param_bytes=param_bytes,
                    grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
                    hardware=Hardware(peak_tflops=peak_tflops, utilization=utilization, nvlink_gbps=nvlink_gbps,
                                      ib_gbps=ib_gbps, node_size=node_size), implementation=implementation)


def evaluate(
    model: ModelLike, seq_len: int, *, strategy: str | None = None, tp: int = 1, sp: int = 1, dp: int = 1,
    ulysses: int | None = None, micro_batch: int = 1, gpu_memory_gb: float = 80.0, sequence_parallel: bool = True,
    dtype_bytes: int = 2, recompute: str = "selective", attention_kernel: str = "math",
    dropout: bool | None = None, causal: bool = True, zero_stage: int = 1, param_bytes: int = 2,
    grad_bytes: int = 2, optimizer_bytes: int = 12, node_size: int = 8, nvlink_gbps: float = 450.0,
    ib_gbps: float = 50.0, peak_tflops: float = 989.0, utilization: float = 0.5, implementation: str = "paper",
) -> Candidate:
    """Cost one layout on ``tp * sp * dp`` GPUs.

    An impossible layout (e.g. Ulysses with ``heads % sp != 0``) comes back as a
    :class:`Candidate` with ``feasible=False`` and the reason, not as an error.
    Memory in bytes per GPU, communication in bytes per GPU per layer, time in
    seconds; arguments as in :func:`plan`.
    """
    cfg = get_config(model)
    st = _settings(micro_batch, gpu_memory_gb, sequence_parallel, dtype_bytes, recompute, attention_kernel,
                   dropout, causal, zero_stage, param_bytes, grad_bytes, optimizer_bytes, node_size,
                   nvlink_gbps, ib_gbps, peak_tflops, utilization, implementation)
    if strategy is None:
        strategy = "none" if sp == 1 and tp == 1 else ("megatron" if sp == 1 else None)  # type: ignore[assignment]
    check(strategy is not None, ConfigError, f"sp={sp} > 1 needs a strategy, one of {SP_STRATEGIES}")
    return _candidate(cfg, seq_len, strategy, tp, sp, dp, ulysses, st)  # type: ignore[arg-type]


@dataclass
class Plan:
    """Result of :func:`plan`.

    Attributes:
        model: the resolved :class:`ModelConfig`.
        seq_len, n_gpus: the request.
        settings: cost-model settings used.
        candidates: every layout considered, fitting ones first (fastest
            first), then those that do not fit (smallest first), then the
            infeasible ones.
        recommended: the fastest fitting candidate.
        reason: one line explaining the recommendation.
    """

    model: ModelConfig
    seq_len: int
    n_gpus: int
    settings: Settings
    candidates: list[Candidate]
    recommended: Candidate
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (only str, int, float, bool, None, list, dict)."""
        return {
            "model": self.model.to_dict(), "seq_len": self.seq_len, "n_gpus": self.n_gpus,
            "settings": self.settings.to_dict(), "recommended": self.recommended.to_dict(),
            "reason": self.reason, "candidates": [c.to_dict() for c in self.candidates],
        }

    def table(self, limit: int | None = None, include_infeasible: bool = True) -> str:
        """Plain-text table of the candidates (``*`` marks the recommendation)."""
        head = ["", "layout", "tp", "sp", "u", "r", "dp", "act GB", "total GB", "fits",
                "comm MB/layer", "step s", "tok/s", "MFU", "note"]
        rows = []
        cands: Iterable[Candidate] = self.candidates
        if not include_infeasible:
            cands = [c for c in cands if c.feasible]
        for c in list(cands)[:limit]:
            m, t = c.memory, c.time
            rows.append([
                "*" if c is self.recommended else "", c.label, str(c.tp), str(c.sp), str(c.ulysses),
                str(c.ring), str(c.dp),
                f"{m.activations / GB:.2f}" if m else "-", f"{m.total_gb:.2f}" if m else "-",
                "yes" if c.fits else ("no" if c.feasible else "n/a"),
                f"{c.comm_bytes / 1e6:.1f}" if c.comm else "-",
                f"{t.step:.4g}" if t else "-", f"{t.tokens_per_s:.4g}" if t else "-",
                f"{t.mfu:.2f}" if t else "-", c.reason if c is not self.recommended else c.reason,
            ])
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
        lines = []
        for r in [head] + rows:
            lines.append("  ".join(x.ljust(w) for x, w in zip(r[:-1], widths)) + "  " + r[-1])
        lines.insert(1, "-" * min(200, len(lines[0])))
        title = (f"{self.model.name}: s={self.seq_len}, {self.n_gpus} GPUs, "
                 f"{self.settings.gpu_memory_gb:g} GB each -> {self.reason}")
        return title + "\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _enumerate(cfg: ModelConfig, seq_len: int, n_gpus: int, tp: int | None, sp: int | None, ulysses: int | None,
               dp: int | None, strategies: Sequence[str],
               node_size: int) -> list[tuple[str, int, int, int, int | None]]:
    out: list[tuple[str, int, int, int, int | None]] = []
    a = cfg.num_attention_heads
    if tp is not None:
        check(n_gpus % tp == 0, ConfigError, f"tp={tp} does not divide n_gpus={n_gpus}")
        tps = [tp]
    else:
        tps = [t for t in divisors(node_size) if t <= a and n_gpus % t == 0]
    for t in tps:
        rest = n_gpus // t
        if dp is not None:
            check(rest % dp == 0, ConfigError, f"dp={dp} does not divide n_gpus/tp={rest}")
            sps = [rest // dp]
        else:
            sps = divisors(rest)
        if sp is not None:
            sps = [x for x in sps if x == sp]
        for n in sps:
            d = rest // n
            if n == 1:
                name = "none" if t == 1 else "megatron"
                if name in strategies:
                    out.append((name, t, 1, d, None))
                continue
            for s_name in SP_STRATEGIES:
                if s_name not in strategies:
                    continue
                if s_name == "usp":
                    us = [ulysses] if ulysses is not None else [x for x in divisors(n) if 1 < x < n]
                    for u in us:
                        if n % u == 0 and 1 < u < n:
                            out.append(("usp", t, n, d, u))
                elif s_name == "ulysses":
                    if ulysses is None or ulysses == n:
                        out.append(("ulysses", t, n, d, None))
                else:
                    out.append((s_name, t, n, d, None))
    return out


def _sort_key(c: Candidate) -> tuple:
    if c.fits:
        return (0, -c.time.tokens_per_s, c.memory.total)  # type: ignore[union-attr]
    if c.feasible:
        return (1, c.memory.total, 0.0)  # type: ignore[union-attr]
    return (2, 0, 0.0)


def _recommend_reason(cfg: ModelConfig, best: Candidate, cands: list[Candidate]) -> str:
    parts = [f"{best.label}: {best.reason or 'fastest fitting layout'}"]
    if best.strategy != "ulysses" and best.sp > 1:
        alone = [c for c in cands if c.strategy == "ulysses" and c.tp == best.tp and c.sp == best.sp
                 and c.dp == best.dp]
        if alone:
            c = alone[0]
            heads = cfg.num_attention_heads // best.tp
            if not c.feasible:
                parts.append(f"ulysses alone needs {best.sp} | heads={heads}: infeasible")
            elif not c.fits:
                parts.append(f"ulysses alone does not fit ({c.memory.total_gb:.1f} GB)")  # type: ignore[union-attr]
            else:
                slower = best.time.tokens_per_s / c.time.tokens_per_s - 1  # type: ignore[union-attr]
                cross = "crosses nodes, " if "crosses nodes" in c.reason else ""
                parts.append(f"ulysses alone {cross}{slower * 100:.1f}% slower")
    others = [c for c in cands if c.fits and c is not best and c.strategy != best.strategy]
    if others:
        nxt = others[0]
        gap = best.time.tokens_per_s / nxt.time.tokens_per_s - 1  # type: ignore[union-attr]
        parts.append(f"next best {nxt.label} is {gap * 100:.1f}% slower")
    return "; ".join(parts)


def plan(
    model: ModelLike, seq_len: int, n_gpus: int, *, micro_batch: int = 1, gpu_memory_gb: float = 80.0,
    tp: int | None = None, sequence_parallel: bool = True, ulysses: int | None = None, dp: int | None = None,
    sp: int | None = None, strategies: Sequence[str] | None = None, dtype_bytes: int = 2,
    recompute: str = "selective", attention_kernel: str = "math", dropout: bool | None = None,
    causal: bool = True, zero_stage: int = 1, param_bytes: int = 2, grad_bytes: int = 2,
    optimizer_bytes: int = 12, node_size: int = 8, nvlink_gbps: float = 450.0, ib_gbps: float = 50.0,
    peak_tflops: float = 989.0, utilization: float = 0.5, implementation: str = "paper",
) -> Plan:
    """Recommend a sequence-parallel layout for ``model`` at ``seq_len`` on ``n_gpus``.

    Args:
        model: registered name, HF-style mapping or :class:`ModelConfig`.
        seq_len: tokens per sequence.
        n_gpus: GPUs in the job (``tp * sp * dp``).
        micro_batch: sequences per micro-batch per data-parallel replica.
        gpu_memory_gb: memory per GPU, GB (1e9 bytes).
        tp, ulysses, dp, sp: fix a degree instead of enumerating it.
        sequence_parallel: Megatron sequence parallelism inside the tp group.
        strategies: restrict to these strategies (default: all).
        dtype_bytes: activation/communication element size (2 = bf16).
        recompute: ``"none"``, ``"selective"`` or ``"full"``.
        attention_kernel: ``"math"`` or ``"flash"``.
        dropout: store dropout masks (``None``: the model's dropout > 0).
        causal: causal mask (halves attention FLOPs).
        zero_stage, param_bytes, grad_bytes, optimizer_bytes: model state
            (default: ZeRO-1, 2 + 2 + 12 = 16 bytes/param).
        node_size: GPUs per node.
        nvlink_gbps, ib_gbps: intra- / inter-node bandwidth per GPU, GB/s.
        peak_tflops, utilization: compute model.
        implementation: activation accounting, ``"paper"`` (Korthikanti et
            al.'s GPT layer, the default) or ``"seqpar"`` (what seqpar's own
            Llama model stores: :mod:`seqpar.plan.implementation`).

    Returns:
        A :class:`Plan`; ``plan.recommended`` is the candidate with the
        highest throughput among those that fit.

    Raises:
        ConfigError: bad arguments, or nothing fits (the message names the
            smallest per-GPU memory any layout needs).
    """
    cfg = get_config(model)
    check(isinstance(n_gpus, int) and n_gpus > 0, ConfigError, f"n_gpus must be a positive int, got {n_gpus!r}")
    check(isinstance(seq_len, int) and seq_len > 0, ConfigError, f"seq_len must be a positive int, got {seq_len!r}")
    strategies = tuple(STRATEGIES if strategies is None else strategies)
    for s_name in strategies:
        check(s_name in STRATEGIES, ConfigError, f"unknown strategy {s_name!r}; known: {', '.join(STRATEGIES)}")
    st = _settings(micro_batch, gpu_memory_gb, sequence_parallel, dtype_bytes, recompute, attention_kernel,
                   dropout, causal, zero_stage, param_bytes, grad_bytes, optimizer_bytes, node_size,
                   nvlink_gbps, ib_gbps, peak_tflops, utilization, implementation)
    combos = _enumerate(cfg, seq_len, n_gpus, tp, sp, ulysses, dp, strategies, node_size)
    check(bool(combos), ConfigError,
          f"no layout of {n_gpus} GPUs matches tp={tp}, sp={sp}, dp={dp}, ulysses={ulysses}, "
          f"strategies={list(strategies)}")
    cands = [_candidate(cfg, seq_len, s_name, t, n, d, u, st) for s_name, t, n, d, u in combos]
    cands.sort(key=_sort_key)
    fitting = [c for c in cands if c.fits]
    if not fitting:
        feas = [c for c in cands if c.feasible]
        if not feas:
            raise ConfigError(f"no feasible layout for {cfg.name} on {n_gpus} GPUs: " + cands[0].reason)
        small = feas[0]
        hints = []
        if recompute != "full":
            hints.append("recompute='full'")
        if zero_stage < 3:
            hints.append("zero_stage=3")
        hints += ["more GPUs", "a shorter sequence"]
        raise ConfigError(
            f"nothing fits in {gpu_memory_gb:g} GB per GPU for {cfg.name} at seq_len={seq_len} on {n_gpus} GPUs: "
            f"the smallest layout ({small.label}) needs {small.memory.total_gb:.1f} GB per GPU "  # type: ignore[union-attr]
            f"({small.memory.activations / GB:.1f} GB activations); try " + ", ".join(hints))
    best = fitting[0]
    return Plan(model=cfg, seq_len=seq_len, n_gpus=n_gpus, settings=st, candidates=cands, recommended=best,
                reason=_recommend_reason(cfg, best, cands))
