"""Enumerate parallel layouts and memory settings, cost them, and recommend the fastest that fits.

:func:`evaluate` costs one layout; :func:`plan` enumerates every layout of ``n_gpus`` GPUs (tensor
parallel ``tp`` in the divisors of the node size up to the head count, sequence parallel ``sp``
over each strategy, and for USP every split ``u x r`` of ``sp``, data parallel ``dp`` for the
rest; a sequence an sp degree does not divide is padded, as :func:`seqpar.shard` pads it) and,
for each, the memory settings left open (:class:`~seqpar.plan.settings.Settings`): recompute,
host offload, chains of layers, tiled MLPs, the chunked loss, ZeRO stage, optimizer offload.  It
recommends the highest cluster throughput (tokens/s) that fits the GPU and the host; ties go to
the layout that communicates less (data parallelism before sequence parallelism), then to the
simpler settings.  :func:`max_seq_len` answers the longest sequence that fits, and how.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from seqpar.core.configs import ModelConfig, ModelLike, get_config
from seqpar.core.errors import ConfigError, check
from seqpar.plan.candidates import Candidate, best_settings, sort_key
from seqpar.plan.memory import GB
from seqpar.plan.parallel_layout import SP_STRATEGIES, STRATEGIES, divisors
from seqpar.plan.settings import Settings

__all__ = ["Candidate", "Plan", "Settings", "NothingFits", "MaxLength", "evaluate", "plan", "max_seq_len",
           "candidates_anyway", "TABLE_HEAD", "table_rows"]

#: the value of each memory setting that saves the most device memory
_THRIFTIEST: dict[str, Any] = {"recompute": "full", "zero_stage": 3, "offload": True, "offload_optimizer": True}
_FIELDS = set(Settings.__dataclass_fields__)


class NothingFits(ConfigError):
    """No layout of the request fits; ``smallest`` needs the least memory, ``suggestions`` are the
    options (name, value) that would save more (``None`` value: more GPUs / a shorter sequence)."""

    def __init__(self, head: str, smallest: Candidate | None, suggestions: list[tuple[str, Any]]):
        words = [f"{n}=None (searched, not {v!r})" if n in _FIELDS else n for n, v in suggestions]
        super().__init__(head + ("; try " + ", ".join(words) if words else ""))
        self.head, self.smallest, self.suggestions = head, smallest, suggestions


def _settings(settings: Settings | None, options: dict[str, Any]) -> Settings:
    if settings is None:
        return Settings.from_options(**options)
    check(not options, ConfigError, f"give settings= or keyword options, not both (got {sorted(options)})")
    return settings


def evaluate(model: ModelLike, seq_len: int, *, strategy: str | None = None, tp: int = 1, sp: int = 1, dp: int = 1,
             ulysses: int | None = None, settings: Settings | None = None, **options: Any) -> Candidate:
    """Cost one layout on ``tp * sp * dp`` GPUs with the given memory settings.

    ``options`` are :class:`Settings` fields (and :class:`~seqpar.plan.timing.Hardware`'s); memory
    settings not given take their plain values (nothing recomputed, tiled or offloaded, ZeRO 0).
    An impossible layout (e.g. Ulysses with ``heads % sp != 0``) comes back as a
    :class:`Candidate` with ``feasible=False`` and the reason, not as an error.  Memory in bytes
    per GPU, communication in bytes per GPU per layer, time in seconds.
    """
    cfg = get_config(model)
    st = _settings(settings, options)
    if strategy is None:
        check(sp == 1, ConfigError, f"sp={sp} > 1 needs a strategy, one of {SP_STRATEGIES}")
        strategy = "none" if tp == 1 else "megatron"
    return best_settings(cfg, seq_len, strategy, tp, sp, dp, ulysses, st, fixed=st.fixed_memory())


@dataclass
class Plan:
    """Result of :func:`plan`.

    Attributes:
        model: the resolved :class:`ModelConfig`.
        seq_len, n_gpus: the request.
        settings: cost-model settings used.
        candidates: every layout considered (each with its best memory settings), fitting ones first
            (fastest first), then those that do not fit (smallest first), then the infeasible ones.
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
        rows = table_rows(self.candidates, self.recommended, limit, include_infeasible)
        widths = [max(len(r[i]) for r in rows + [TABLE_HEAD]) for i in range(len(TABLE_HEAD) - 1)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [TABLE_HEAD] + rows]
        lines.insert(1, "-" * min(200, len(lines[0])))
        title = (f"{self.model.name}: s={self.seq_len}, {self.n_gpus} GPUs, "
                 f"{self.settings.gpu_memory_gb:g} GB each -> {self.reason}")
        return title + "\n" + "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


TABLE_HEAD = ["", "layout", "tp", "sp", "u", "r", "dp", "memory settings", "act GB", "total GB", "fits",
              "comm MB/layer", "step s", "tok/s", "MFU", "note"]


def table_rows(cands: Iterable[Candidate], recommended: Candidate | None, limit: int | None,
               include_infeasible: bool) -> list[list[str]]:
    """The rows of a plan's table (the columns of :data:`TABLE_HEAD`)."""
    out = []
    for c in [c for c in cands if include_infeasible or c.feasible][:limit]:
        m, t = c.memory, c.time
        out.append(["*" if c is recommended else "", c.label, str(c.tp), str(c.sp), str(c.ulysses), str(c.ring),
                    str(c.dp), c.settings.label if c.feasible else "-",
                    f"{m.activations / GB:.2f}" if m else "-", f"{m.total_gb:.2f}" if m else "-",
                    "yes" if c.fits else ("no" if c.feasible else "n/a"),
                    f"{c.comm_bytes / 1e6:.1f}" if c.comm else "-", f"{t.step:.4g}" if t else "-",
                    f"{t.tokens_per_s:.4g}" if t else "-", f"{t.mfu:.2f}" if t else "-", c.reason])
    return out


def _enumerate(cfg: ModelConfig, n_gpus: int, tp: int | None, sp: int | None, ulysses: int | None,
               dp: int | None, strategies: Sequence[str],
               node_size: int) -> list[tuple[str, int, int, int, int | None]]:
    out: list[tuple[str, int, int, int, int | None]] = []
    if tp is not None:
        check(n_gpus % tp == 0, ConfigError, f"tp={tp} does not divide n_gpus={n_gpus}")
        tps = [tp]
    else:
        tps = [t for t in divisors(node_size) if t <= cfg.num_attention_heads and n_gpus % t == 0]
    for t in tps:
        rest = n_gpus // t
        if dp is not None:
            check(rest % dp == 0, ConfigError, f"dp={dp} does not divide n_gpus/tp={rest}")
        sps = [rest // dp] if dp is not None else divisors(rest)
        for n in (x for x in sps if sp is None or x == sp):
            d = rest // n
            if n == 1:
                name = "none" if t == 1 else "megatron"
                if name in strategies:
                    out.append((name, t, 1, d, None))
                continue
            for s_name in (s for s in SP_STRATEGIES if s in strategies):
                if s_name == "usp":
                    us = [ulysses] if ulysses is not None else [x for x in divisors(n) if 1 < x < n]
                    out += [("usp", t, n, d, u) for u in us if n % u == 0 and 1 < u < n]
                elif s_name == "ulysses":
                    if ulysses is None or ulysses == n:
                        out.append(("ulysses", t, n, d, None))
                else:
                    out.append((s_name, t, n, d, None))
    return out


def _recommend_reason(cfg: ModelConfig, best: Candidate, cands: list[Candidate]) -> str:
    parts = [f"{best.label} [{best.settings.label}]: {best.reason or 'fastest fitting layout'}"]
    if best.strategy != "ulysses" and best.sp > 1:
        alone = [c for c in cands if c.strategy == "ulysses" and c.tp == best.tp and c.sp == best.sp
                 and c.dp == best.dp]
        if alone:
            c = alone[0]
            heads = cfg.num_attention_heads // best.tp
            if not c.feasible:
                parts.append(f"ulysses alone needs {best.sp} | heads={heads}: infeasible")
            elif not c.fits and c.memory is not None:
                parts.append(f"ulysses alone does not fit ({c.memory.total_gb:.1f} GB)")
            elif c.time is not None and best.time is not None:
                slower = best.time.tokens_per_s / c.time.tokens_per_s - 1
                cross = "crosses nodes, " if "crosses nodes" in c.reason else ""
                parts.append(f"ulysses alone {cross}{slower * 100:.1f}% slower")
    others = [c for c in cands if c.fits and c is not best and c.strategy != best.strategy]
    if others and others[0].time is not None and best.time is not None:
        gap = best.time.tokens_per_s / others[0].time.tokens_per_s - 1
        parts.append(f"next best {others[0].label} is {gap * 100:.1f}% slower")
    return "; ".join(parts)


def _candidates(cfg: ModelConfig, seq_len: int, n_gpus: int, st: Settings, tp: int | None, sp: int | None,
                dp: int | None, ulysses: int | None, strategies: Sequence[str] | None,
                thrifty: bool = False) -> list[Candidate]:
    check(isinstance(n_gpus, int) and n_gpus > 0, ConfigError, f"n_gpus must be a positive int, got {n_gpus!r}")
    check(isinstance(seq_len, int) and seq_len > 0, ConfigError, f"seq_len must be a positive int, got {seq_len!r}")
    names = tuple(STRATEGIES if strategies is None else strategies)
    for s_name in names:
        check(s_name in STRATEGIES, ConfigError, f"unknown strategy {s_name!r}; known: {', '.join(STRATEGIES)}")
    combos = _enumerate(cfg, n_gpus, tp, sp, ulysses, dp, names, st.hardware.node_size)
    check(bool(combos), ConfigError, f"no layout of {n_gpus} GPUs matches tp={tp}, sp={sp}, dp={dp}, "
                                     f"ulysses={ulysses}, strategies={list(names)}")
    cands = [best_settings(cfg, seq_len, s_name, t, n, d, u, st, thrifty=thrifty) for s_name, t, n, d, u in combos]
    return sorted(cands, key=sort_key)


def _nothing_fits(cfg: ModelConfig, seq_len: int, n_gpus: int, st: Settings, cands: list[Candidate]) -> NothingFits:
    feas = [c for c in cands if c.feasible]
    if not feas:
        return NothingFits(f"no feasible layout for {cfg.name} on {n_gpus} GPUs: " + cands[0].reason, None, [])
    small = feas[0]
    # a memory setting fixed to what saves less than the search could: let the planner search it
    hints: list[tuple[str, Any]] = [(name, getattr(st, name)) for name, best in _THRIFTIEST.items()
                                    if getattr(st, name) is not None and getattr(st, name) != best]
    hints += [("more GPUs", None), ("a shorter sequence", None)]
    mem = small.memory
    need = f"{mem.total_gb:.1f} GB per GPU ({mem.activations / GB:.1f} GB activations" if mem else "more memory ("
    host = f", {mem.host / GB:.1f} GB in host memory" if mem and mem.host else ""
    return NothingFits(
        f"nothing fits in {st.gpu_memory_gb:g} GB per GPU for {cfg.name} at seq_len={seq_len} on {n_gpus} GPUs: "
        f"the smallest layout ({small.label} [{small.settings.label}]) needs {need}{host})", small, hints)


def plan(model: ModelLike, seq_len: int, n_gpus: int, *, tp: int | None = None, sp: int | None = None,
         dp: int | None = None, ulysses: int | None = None, strategies: Sequence[str] | None = None,
         settings: Settings | None = None, **options: Any) -> Plan:
    """Recommend a sequence-parallel layout and memory settings for ``model`` at ``seq_len`` on ``n_gpus``.

    Args:
        model: registered name, HF-style mapping or :class:`ModelConfig`.
        seq_len: tokens per sequence.
        n_gpus: GPUs in the job (``tp * sp * dp``).
        tp, sp, dp, ulysses: fix a degree instead of enumerating it.
        strategies: restrict to these strategies (default: all).
        settings: a :class:`Settings`, or instead its fields as keyword ``options``:
            ``micro_batch``, ``gpu_memory_gb``, ``host_memory_gb`` (per node), ``sequence_parallel``,
            ``dtype_bytes``, ``attention_kernel``, ``dropout``, ``causal``, ``param_bytes``,
            ``grad_bytes``, ``optimizer_bytes`` (default 2 + 2 + 12: bf16 with fp32 Adam),
            ``implementation`` (``"paper"`` or ``"seqpar"``), the memory settings ``recompute``,
            ``offload``, ``checkpoint_every``, ``mlp_tiles``, ``loss_chunk``, ``zero_stage``,
            ``offload_optimizer`` (each searched unless given), and :class:`~seqpar.plan.timing.Hardware`'s
            ``node_size``, ``nvlink_gbps``, ``ib_gbps``, ``pcie_gbps``, ``peak_tflops``, ``utilization``,
            ``cpu_adam_gparams``.

    Returns:
        A :class:`Plan`; ``plan.recommended`` is the fastest candidate that fits.

    Raises:
        ConfigError: bad arguments; :class:`NothingFits` (a ConfigError) when nothing fits (the
            message names the smallest per-GPU memory any layout needs and what to try).
    """
    cfg = get_config(model)
    st = _settings(settings, options)
    cands = _candidates(cfg, seq_len, n_gpus, st, tp, sp, dp, ulysses, strategies)
    if not cands[0].fits:
        raise _nothing_fits(cfg, seq_len, n_gpus, st, cands)
    best = cands[0]
    return Plan(model=cfg, seq_len=seq_len, n_gpus=n_gpus, settings=st, candidates=cands, recommended=best,
                reason=_recommend_reason(cfg, best, cands))


def candidates_anyway(model: ModelLike, seq_len: int, n_gpus: int, **kwargs: Any) -> list[Candidate]:
    """Every candidate :func:`plan` would weigh, sorted, even when none fits (what ``--all`` lists)."""
    cfg = get_config(model)
    degrees = {k: kwargs.pop(k, None) for k in ("tp", "sp", "dp", "ulysses", "strategies")}
    st = _settings(kwargs.pop("settings", None), kwargs)
    return _candidates(cfg, seq_len, n_gpus, st, **degrees)


@dataclass
class MaxLength:
    """Result of :func:`max_seq_len`: the longest ``seq_len`` (a multiple of ``step``) that fits, and its plan."""

    seq_len: int
    step: int
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        return {"max_seq_len": self.seq_len, "step": self.step, **self.plan.to_dict()}


def max_seq_len(model: ModelLike, n_gpus: int, *, step: int = 1024, limit: int = 1 << 30, tp: int | None = None,
                sp: int | None = None, dp: int | None = None, ulysses: int | None = None,
                strategies: Sequence[str] | None = None, settings: Settings | None = None,
                **options: Any) -> MaxLength:
    """The longest sequence (a multiple of ``step``, at most ``limit``) that fits on ``n_gpus``, and how.

    A bisection over lengths, each judged with the most memory-saving settings the options leave
    open; the answer's :class:`Plan` then weighs every setting at that length (the recommendation
    is the fastest that fits there).  Options as :func:`plan`.  Raises :class:`NothingFits` when not
    even ``step`` tokens fit.
    """
    cfg = get_config(model)
    st = _settings(settings, options)
    kw: dict[str, Any] = dict(tp=tp, sp=sp, dp=dp, ulysses=ulysses, strategies=strategies)

    def fits(s: int) -> bool:
        return _candidates(cfg, s, n_gpus, st, thrifty=True, **kw)[0].fits

    if not fits(step):
        plan(cfg, step, n_gpus, settings=st, **kw)  # raises NothingFits with the smallest layout named
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi * step):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return MaxLength(seq_len=lo * step, step=step, plan=plan(cfg, lo * step, n_gpus, settings=st, **kw))
