"""The planner's longest sequence for Llama-3-8B on H100 80GB (bf16, AdamW), beside ALST's and FPDT's figures.

For 1, 4, 8 and 32 GPUs (8 per node, 2 TB of host memory per node), :func:`seqpar.plan.max_seq_len`
with seqpar's own accounting (``implementation="seqpar"``, validated on CPU by
``benchmarks/memory_peak.py``) answers the longest sequence that fits and the fastest layout and
memory settings there, with the estimated step time and MFU.  Two model-state assumptions:
``seqpar train`` as it runs (weights, gradients and AdamW's moments in bf16: 8 bytes per
parameter) and the mixed precision ALST and FPDT train with (bf16 weights and gradients, fp32
master weights and moments: 16 bytes per parameter).

    python benchmarks/long_context_plan.py
"""
from __future__ import annotations

import argparse
import sys

import seqpar

#: published figures: GPUs -> (ALST, FPDT) longest sequence for Llama-3-8B-class models (tokens)
PUBLISHED = {1: ("500K", "-"), 4: ("-", "2M (8B, >55% MFU)"), 8: ("3.7M", "-"), 32: ("15M", "-")}
TARGETS = {1: 512 * 1024, 4: 2 * 2**20, 8: 4 * 2**20, 32: 16 * 2**20}
STATES = {"seqpar train (bf16 AdamW, 8 B/param)": dict(param_bytes=2, grad_bytes=2, optimizer_bytes=4),
          "mixed precision (16 B/param)": dict(param_bytes=2, grad_bytes=2, optimizer_bytes=12)}


def figures(gpus=(1, 4, 8, 32), step: int = 16384) -> list[dict]:
    out = []
    for name, state in STATES.items():
        for n in gpus:
            m = seqpar.plan.max_seq_len("llama3-8b", n, step=step, implementation="seqpar", attention_kernel="flash",
                                        dtype_bytes=2, **state)
            best = m.plan.recommended
            out.append({"state": name, "gpus": n, "max_seq_len": m.seq_len, "layout": best.label,
                        "settings": best.settings.label, "peak_gb": best.memory.total_gb,
                        "phase": best.memory.peak_phase, "host_gb_per_gpu": best.memory.host / 1e9,
                        "step_s": best.time.step, "mfu": best.time.mfu, "target": TARGETS.get(n)})
    return out


def table(rows: list[dict]) -> str:
    head = ["model state", "GPUs", "longest sequence", "target", "ALST", "FPDT", "layout", "memory settings",
            "peak GB/GPU (at)", "host GB/GPU", "step s", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        alst, fpdt = PUBLISHED.get(r["gpus"], ("-", "-"))
        tokens = f"{r['max_seq_len'] / 2**20:.2f}M ({r['max_seq_len']})"
        target = f"{r['target'] / 2**20:g}M" + (" ok" if r["max_seq_len"] >= r["target"] else " MISSED")
        lines.append("| " + " | ".join([r["state"], str(r["gpus"]), tokens, target, alst, fpdt, r["layout"],
                                         r["settings"], f"{r['peak_gb']:.1f} ({r['phase']})",
                                         f"{r['host_gb_per_gpu']:.0f}", f"{r['step_s']:.0f}",
                                         f"{r['mfu']:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8, 32])
    ap.add_argument("--step", type=int, default=16384, help="length granularity (tokens)")
    ns = ap.parse_args(argv)
    print(table(figures(ns.gpus, ns.step)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
