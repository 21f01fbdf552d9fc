"""Helpers shared by the tensor-parallel tests (worker side and parent side).

Layout used throughout: the sequence is cut into ``sp`` contiguous chunks, one per
sequence-parallel rank; with ``sequence_parallel=True`` each chunk is cut again
into ``tp`` pieces, one per tensor-parallel rank (global shard ``sp_rank * tp + tp_rank``);
without it the chunk is replicated over the tp ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import seqpar

# (world size, tp degree): tp == world, and tp=2 x sp=2 so the tp group is not the world
CONFIGS = [(1, 1), (2, 2), (4, 4), (4, 2)]
CONFIG_IDS = ["w1-tp1", "w2-tp2", "w4-tp4", "w4-tp2-sp2"]


def info(m: seqpar.Mesh) -> dict:
    return {"tp": m.tp, "tp_rank": m.rank("tp"), "sp": m.sp, "sp_rank": m.rank("sp")}


def shard_seq(full: torch.Tensor, inf: dict, sequence_parallel: bool, dim: int = 1) -> torch.Tensor:
    """This rank's piece of a full (identical on every rank) tensor along the sequence dim."""
    piece = full.chunk(inf["sp"], dim)[inf["sp_rank"]]
    if sequence_parallel:
        piece = piece.chunk(inf["tp"], dim)[inf["tp_rank"]]
    return piece.contiguous()


def sum_over_sp(tensors, m: seqpar.Mesh) -> None:
    """Sum in place over the sp group (what data parallelism over dp_sp does in a real run)."""
    if m.sp > 1:
        for t in tensors:
            dist.all_reduce(t, group=m.sp_group)


def assemble(results: list, key: str, sequence_parallel: bool, dim: int = 1) -> torch.Tensor:
    """The full tensor from every rank's piece ``results[r][key]`` (checking tp replicas agree)."""
    inf = results[0]["info"]
    tp, sp = inf["tp"], inf["sp"]
    by = {(r["info"]["sp_rank"], r["info"]["tp_rank"]): r[key] for r in results}
    if sequence_parallel:
        return torch.cat([by[(s, t)] for s in range(sp) for t in range(tp)], dim)
    for s in range(sp):
        for t in range(1, tp):
            assert torch.equal(by[(s, t)], by[(s, 0)]), f"{key}: tp replicas differ (sp {s}, tp {t})"
    return torch.cat([by[(s, 0)] for s in range(sp)], dim)


def full_randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
