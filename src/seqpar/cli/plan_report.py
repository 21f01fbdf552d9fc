"""What ``seqpar plan`` prints and draws: the candidates' table (rich or plain), the plot, the inference plan."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Callable
from typing import Any

from ..core.configs import ModelConfig
from ..core.errors import SeqParError
from ..plan.candidates import Candidate
from ..plan.planner import TABLE_HEAD, table_rows

__all__ = ["print_table", "plot", "plain_table"]


def plain_table(rows: list[list[str]]) -> str:
    """The rows as aligned plain text under :data:`~seqpar.plan.planner.TABLE_HEAD`."""
    widths = [max(len(r[i]) for r in rows + [TABLE_HEAD]) for i in range(len(TABLE_HEAD) - 1)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [TABLE_HEAD] + rows]
    lines.insert(1, "-" * min(160, len(lines[0])))
    return "\n".join(lines)


def print_table(cands: list[Candidate], recommended: Candidate | None, limit: int | None, show_all: bool,
                plain: bool) -> int:
    """Print the candidates (rich when installed and not ``plain``); returns how many rows were shown."""
    rows = table_rows(cands, recommended, limit, show_all)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(plain_table(rows))
        return len(rows)
    fits_col = TABLE_HEAD.index("fits")
    table = Table(show_lines=False, header_style="bold")
    for i, name in enumerate(TABLE_HEAD):
        numeric = name not in ("", "layout", "memory settings", "fits", "note")
        table.add_column(name, justify="right" if numeric else "left", overflow="fold",
                         no_wrap=i != len(TABLE_HEAD) - 1)
    for r in rows:
        table.add_row(*map(Text, r), style="bold green" if r[0] == "*" else ("dim" if r[fits_col] != "yes" else None))
    width = shutil.get_terminal_size((200, 40)).columns if sys.stdout.isatty() else 200
    Console(file=sys.stdout, width=max(width, 120)).print(table)
    return len(rows)


def _sweep(cfg: ModelConfig, seq_len: int, gpus: int, options: dict[str, Any], gpu_memory: float,
           planner: Callable[..., Any]) -> dict[str, list[tuple]]:
    """Per scheme and sequence length: ``(S, GB, s)``: the smallest memory per GPU of any of its layouts,
    and the seconds per sequence (``S / tokens per s``) of its fastest fitting layout (NaN when none fits).

    Seconds per sequence, not per step: layouts with more data parallelism take longer steps over more
    sequences, so only throughput compares them."""
    unit = 2 * gpus
    scaled = (seq_len << k if k >= 0 else seq_len >> -k for k in range(-5, 3))  # S/32 .. 4S
    lengths = sorted({max(unit, x // unit * unit) for x in scaled})
    lines: dict[str, list[tuple]] = {}
    for s in lengths:
        try:  # a huge memory budget: plan() then never refuses, and "fits" is judged against the real one
            p = planner(cfg, s, gpus, **{**options, "gpu_memory_gb": 1e12})
        except SeqParError:
            continue
        mem: dict[str, float] = {}
        speed: dict[str, float] = {}
        for c in p.candidates:
            if not c.feasible or c.memory is None or c.time is None:
                continue
            gb = c.memory.total_gb
            mem[c.strategy] = min(mem.get(c.strategy, math.inf), gb)
            if gb <= gpu_memory:
                speed[c.strategy] = max(speed.get(c.strategy, 0.0), c.time.tokens_per_s)
        for name, gb in mem.items():
            lines.setdefault(name, []).append((s, gb, s / speed[name] if name in speed else math.nan))
    return lines


def plot(cfg: ModelConfig, ns: argparse.Namespace, options: dict[str, Any], path: str,
         planner: Callable[..., Any]) -> None:
    """Memory and seconds per sequence against sequence length, one line per scheme (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    lines = _sweep(cfg, ns.seq_len, ns.gpus, options, ns.gpu_memory, planner)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in sorted(lines.items()):
        xs = [x[0] for x in pts]
        ax_m.plot(xs, [x[1] for x in pts], marker="o", label=name)
        ax_t.plot(xs, [x[2] for x in pts], marker="o", label=name)
    ax_m.axhline(ns.gpu_memory, color="k", ls="--", lw=1, label=f"{ns.gpu_memory:g} GB per GPU")
    for ax, ylabel in ((ax_m, "memory per GPU, GB (its smallest layout)"),
                       (ax_t, "seconds per sequence (its fastest fitting layout)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{cfg.name} on {ns.gpus} GPUs, micro-batch {ns.micro_batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2))
