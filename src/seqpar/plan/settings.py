"""What the planner holds fixed besides the degrees, and which memory settings it searches.

:class:`Settings` gathers the cost model's inputs (dtype sizes, accounting, GPU memory, host
memory, hardware) and the memory settings seqpar runs (:class:`~seqpar.plan.peak.MemorySettings`).
A memory setting left ``None`` is searched: :meth:`Settings.memory_options` lists the combinations
the planner tries for a layout, the most memory-saving last.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any

from seqpar.core.errors import ConfigError, check
from seqpar.plan.implementation import IMPLEMENTATIONS
from seqpar.plan.parallel_layout import ATTENTION_KERNELS, RECOMPUTE_MODES, ParallelLayout
from seqpar.plan.peak import ZERO_STAGES, MemorySettings
from seqpar.plan.timing import Hardware

__all__ = ["Settings", "MEMORY_FIELDS", "DEFAULT_LOSS_CHUNK", "TILE_TOKENS", "CHAIN_LENGTHS"]

#: the memory settings of :class:`~seqpar.plan.peak.MemorySettings` (``None`` in Settings: searched)
MEMORY_FIELDS = tuple(f.name for f in fields(MemorySettings))
#: tokens per loss chunk the search tries (seqpar's default, ``seqpar.train.DEFAULT_LOSS_CHUNK``)
DEFAULT_LOSS_CHUNK = 4096
#: the search tiles the MLP so that a tile holds about this many tokens of the MLP's input
TILE_TOKENS = 4096
#: layers per checkpoint the search tries with ``recompute="full"`` (``checkpoint_every``)
CHAIN_LENGTHS = (1, 2, 4)
_HARDWARE_FIELDS = tuple(f.name for f in fields(Hardware))


@dataclass(frozen=True)
class Settings:
    """Everything besides the layout that the cost model needs.

    Memory settings left ``None`` (``recompute``, ``offload``, ``checkpoint_every``, ``mlp_tiles``,
    ``loss_chunk``, ``zero_stage``, ``offload_optimizer``) are searched by :func:`seqpar.plan.plan`;
    ``host_memory_gb`` is per node of ``hardware.node_size`` GPUs (a DGX H100: 2 TB).
    """

    micro_batch: int = 1
    gpu_memory_gb: float = 80.0
    host_memory_gb: float = 2000.0
    sequence_parallel: bool = True
    dtype_bytes: int = 2
    attention_kernel: str = "math"
    dropout: bool | None = None
    causal: bool = True
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12
    hardware: Hardware = field(default_factory=Hardware)
    implementation: str = "paper"
    recompute: str | None = None
    offload: bool | None = None
    checkpoint_every: int | None = None
    mlp_tiles: int | None = None
    loss_chunk: int | None = None
    zero_stage: int | None = None
    offload_optimizer: bool | None = None

    def __post_init__(self) -> None:
        check(self.recompute is None or self.recompute in RECOMPUTE_MODES, ConfigError,
              f"recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        check(self.attention_kernel in ATTENTION_KERNELS, ConfigError,
              f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
        check(self.implementation in IMPLEMENTATIONS, ConfigError,
              f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        check(self.zero_stage is None or self.zero_stage in (0, 1, 2, 3), ConfigError,
              f"zero_stage must be 0-3, got {self.zero_stage!r}")
        check(self.gpu_memory_gb > 0, ConfigError, f"gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        check(self.host_memory_gb >= 0, ConfigError, f"host_memory_gb must be >= 0, got {self.host_memory_gb}")
        check(isinstance(self.micro_batch, int) and self.micro_batch > 0, ConfigError,
              f"micro_batch must be a positive int, got {self.micro_batch!r}")
        for name in ("dtype_bytes", "param_bytes", "grad_bytes", "optimizer_bytes"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0 and (v > 0 or name == "optimizer_bytes"), ConfigError,
                  f"{name} must be a positive int, got {v!r}")
        fixed = {k: getattr(self, k) for k in MEMORY_FIELDS if getattr(self, k) is not None}
        MemorySettings(**{**_CONSISTENT, **fixed})  # names a bad value or a fixed pair that cannot go together

    @classmethod
    def from_options(cls, **options: Any) -> Settings:
        """Settings from keyword options: its own fields and :class:`Hardware`'s (``node_size``, ...)."""
        known = {f.name for f in fields(cls)} - {"hardware"}
        unknown = sorted(set(options) - known - set(_HARDWARE_FIELDS))
        check(not unknown, ConfigError, f"unknown planner option(s) {unknown}; known: "
              f"{sorted(known | set(_HARDWARE_FIELDS))}")
        hw = {k: options.pop(k) for k in list(options) if k in _HARDWARE_FIELDS}
        return cls(**options, hardware=Hardware(**hw))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hardware"}
        d.update(dataclasses.asdict(self.hardware))
        return d

    def fixed_memory(self) -> MemorySettings:
        """The memory settings with every unset one at its plain value (nothing recomputed, offloaded...)."""
        return MemorySettings(**{k: getattr(self, k) for k in MEMORY_FIELDS if getattr(self, k) is not None})

    def memory_options(self, lay: ParallelLayout, *, thrifty: bool = False) -> list[MemorySettings]:
        """The memory settings to try for ``lay``: fixed ones as given, the others searched.

        ``thrifty``: only the combinations that save the most memory (what the longest sequence needs).
        """
        rec = [self.recompute] if self.recompute is not None else (["full"] if thrifty else list(RECOMPUTE_MODES))
        rows = lay.micro_batch * lay.s_replicated
        tiles_on = max(2, math.ceil(rows / TILE_TOKENS))
        tiles = [self.mlp_tiles] if self.mlp_tiles is not None else ([tiles_on] if thrifty else [1, tiles_on])
        chunks = [self.loss_chunk] if self.loss_chunk is not None else (
            [DEFAULT_LOSS_CHUNK] if thrifty else [0, DEFAULT_LOSS_CHUNK])
        zeros = [self.zero_stage] if self.zero_stage is not None else ([3] if thrifty else list(ZERO_STAGES))
        out = []
        for r, t, c, z in itertools.product(rec, tiles, chunks, zeros):
            offs = [self.offload] if self.offload is not None else ([False, True] if r == "full" else [False])
            chains = [self.checkpoint_every] if self.checkpoint_every is not None else (
                list(CHAIN_LENGTHS) if r == "full" else [1])
            opts = [self.offload_optimizer] if self.offload_optimizer is not None else (
                [False, True] if z >= 2 else [False])
            for o, k, oo in itertools.product(offs, chains, opts):
                if (o and r != "full") or (k > 1 and r != "full") or (oo and z < 2):
                    continue
                out.append(MemorySettings(recompute=r, offload=o, checkpoint_every=k, mlp_tiles=t, loss_chunk=c,
                                          zero_stage=z, offload_optimizer=oo))
        return out


#: values under which any single fixed setting is consistent (checked in Settings.__post_init__)
_CONSISTENT = {"recompute": "full", "zero_stage": 3}
