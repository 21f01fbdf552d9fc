"""Draw the documentation's figures from the benchmarks' JSON (``docs/figures/data/*.json``).

    python docs/figures/plot.py [--out docs/_generated]

Each figure names what it was measured on and with which command (both from its JSON, written
by ``docs/figures/record.py``).  The Sphinx build runs this, so a figure is never older than its
data.  Needs matplotlib (the ``docs`` extra).
"""
from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE.parent / "_generated"


def load(name: str, data: Path = DATA) -> dict:
    """The record ``name`` with its rows as dicts keyed by column."""
    rec = json.loads((data / f"{name}.json").read_text())
    rec["dicts"] = [dict(zip(rec["columns"], r)) for r in rec["rows"]]
    return rec


def num(cell: str, part: int = 0) -> float:
    """``"188 / 163"`` -> 188.0 (part 0) or 163.0 (part 1); ``"0.52"`` -> 0.52."""
    return float(cell.split("/")[part].strip())


def _attention(rec: dict, axes) -> None:
    ax_t, ax_m = axes
    lengths = sorted({int(r["S"]) for r in rec["dicts"]})
    names = [r["strategy"] for r in rec["dicts"] if int(r["S"]) == lengths[0]]
    width = 0.8 / len(lengths)
    for i, s in enumerate(lengths):
        rows = [r for r in rec["dicts"] if int(r["S"]) == s]
        xs = [j + i * width for j in range(len(rows))]
        ax_t.bar(xs, [num(r["x single-device SDPA"]) for r in rows], width, label=f"S = {s}")
        ax_m.bar(xs, [num(r["saved vs single"]) for r in rows], width, label=f"S = {s}")
    for ax, label in ((ax_t, "time, x single-device SDPA"), (ax_m, "saved activations, x single device")):
        ax.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(names))], names, rotation=20)
        ax.axhline(0.5, color="k", ls="--", lw=1)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.legend(fontsize=8)
    ax_t.set_title("forward + backward, 2 ranks (dashed: ideal 1/2)", fontsize=9)
    ax_m.set_title("activations saved for backward per rank", fontsize=9)


def _ring_efficiency(rec: dict, axes) -> None:
    (ax,) = axes
    for causal in ("yes", "no"):
        for pas in ("fwd", "bwd"):
            rows = sorted((r for r in rec["dicts"] if r["causal"] == causal and r["pass"] == pas),
                          key=lambda r: int(r["S"]))
            ax.plot([int(r["S"]) for r in rows], [num(r["efficiency"]) for r in rows], marker="o",
                    label=f"{'causal' if causal == 'yes' else 'full'} {pas}")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(r["S"]) for r in rec["dicts"]}))
    _plain_ticks(ax.xaxis)
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("sequence length S, N = 4 ranks")
    ax.set_ylabel("efficiency (ideal 1)")
    ax.set_title("(single-device time / N) / one rank's ring compute", fontsize=9)
    ax.legend(fontsize=8)


def _inference(rec: dict, axes) -> None:
    ax_p, ax_d = axes
    rows = sorted(rec["dicts"], key=lambda r: int(r["prompt"]))
    xs = [int(r["prompt"]) for r in rows]
    pre = next(c for c in rec["columns"] if c.startswith("prefill"))
    dec = next(c for c in rec["columns"] if c.startswith("decode"))
    ax_p.plot(xs, [num(r[pre], 0) for r in rows], marker="o", label="one device")
    ax_p.plot(xs, [num(r[pre], 1) for r in rows], marker="o", label="2 ranks, ring (zigzag)")
    ax_d.plot(xs, [num(r[dec], 0) for r in rows], marker="o", label="one device")
    ax_d.plot(xs, [num(r[dec], 1) for r in rows], marker="o", label="2 ranks, sharded KV cache")
    for ax, label in ((ax_p, "prefill, ms"), (ax_d, "decode, ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax_p.set_yscale("log")
    _plain_ticks(ax_p.yaxis)


def _plain_ticks(axis) -> None:
    """Log axes labelled 512, 2048... rather than 2^9, 2^11."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


#: name -> (panels, drawing function, title)
FIGURES: dict[str, tuple[int, Callable, str]] = {
    "attention_cpu": (2, _attention, "Attention strategies against single-device SDPA"),
    "ring_efficiency_cpu": (1, _ring_efficiency, "Decomposition efficiency of one ring rank"),
    "inference_cpu": (2, _inference, "Long-context inference, reference model"),
    "inference_hf_cpu": (2, _inference, "Long-context inference, a stock Hugging Face Llama"),
}


def draw(name: str, out: Path = OUT, data: Path = DATA) -> Path:
    """Draw figure ``name`` into ``out/name.svg`` (reproducible: no timestamp in the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = name
    panels, fn, title = FIGURES[name]
    rec = load(name, data)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    fn(rec, list(axes[0]))
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
    where = textwrap.fill(f"measured on {rec['machine']}, {rec['date']}", 60 * panels)
    fig.suptitle(f"{title}\n{where}", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.svg"
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("names", nargs="*", default=sorted(FIGURES), help="figures to draw (default all)")
    ns = p.parse_args(argv)
    for name in ns.names:
        print(draw(name, ns.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
