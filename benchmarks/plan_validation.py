"""The planner's activation memory against what seqpar's Llama model really stores.

For each parallel layout (``CASES``) and sequence length, on local ranks, this
measures the bytes autograd saves for backward (``seqpar.stats.saved_activations``,
weights excluded) for one decoder layer of :class:`seqpar.models.LlamaForCausalLM`
and for the whole model (forward + ``seqpar.train.causal_lm_loss``), and prints
them next to :func:`seqpar.plan.activation_memory_per_layer` /
:func:`seqpar.plan.activation_memory` with ``implementation="seqpar"`` (and, for
reference, the default ``"paper"`` accounting with a fused kernel). ``--terms``
also prints the measured bytes grouped by the source line that saved them,
which is how the ``seqpar`` accounting was derived.

``--device cuda`` runs every rank on cuda:0 (gloo) and adds what the CUDA
caching allocator says: bytes still allocated after the forward (outputs
dropped, graph kept: what backward holds) and the forward's peak above the
starting point. This needs a GPU machine; the CPU run is in
``benchmarks/PLAN_VALIDATION.md``.

Examples::

    python benchmarks/plan_validation.py                       # CPU, float32, S = 512 and 2048
    python benchmarks/plan_validation.py --device cuda --dtype bfloat16 --seq-lens 4096 16384
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

import seqpar
from seqpar.core.configs import ModelConfig
from seqpar.models import LlamaForCausalLM
from seqpar.plan import activation_memory, activation_memory_per_layer
from seqpar.core.stats import saved_activations

#: A small Llama-shaped model: GQA 4:1, SwiGLU width ~ 8h/3, two layers.
CONFIG = ModelConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_layers=2,
                     ffn_hidden_size=704, vocab_size=1024, name="validation")

#: name -> (world size, mesh degrees, attention strategy, Megatron sequence parallelism)
CASES: dict[str, tuple[int, dict, str, bool]] = {
    "1 GPU": (1, {}, "ring", True),
    "tp=2 +SP": (2, {"tp": 2}, "ring", True),
    "tp=2 no SP": (2, {"tp": 2}, "ring", False),
    "ring sp=2": (2, {"sp": 2}, "ring", True),
    "ulysses sp=2": (2, {"sp": 2}, "ulysses", True),
    "allgather sp=2": (2, {"sp": 2}, "allgather", True),
    "ring_qk_av sp=2": (2, {"sp": 2}, "ring_qk_av", True),
    "ring sp=2 tp=2": (4, {"sp": 2, "tp": 2}, "ring", True),
    "usp u=2 r=2": (4, {"sp": 4, "ulysses": 2}, "usp", True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

_MESHES: dict = {}


def _mesh(degrees: dict) -> seqpar.Mesh:
    """This worker's mesh for ``degrees``, built once (creating groups is a collective)."""
    key = tuple(sorted(degrees.items()))
    if key not in _MESHES:
        _MESHES[key] = seqpar.init(**degrees)
    return _MESHES[key]


class _BySource:
    """Saved-tensor hook that also groups the bytes by the seqpar source line that saved them."""

    def __init__(self, exclude) -> None:
        self.seen = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
        self.rows: collections.Counter = collections.Counter()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self.seen:
            self.seen.add(key)
            frames = [f for f in traceback.extract_stack() if "/seqpar/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            self.rows[f"{where} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"] += t.untyped_storage().nbytes()
        return t


def measure(case: str, seq_len: int, dtype: str = "float32", device: str = "cpu", terms: bool = False) -> dict:
    """Worker task: saved bytes of one layer and of the whole model on this rank (+ CUDA allocator figures)."""
    from seqpar.train.loss import causal_lm_loss

    _, degrees, strategy, spar = CASES[case]
    m = _mesh(degrees)
    dt = DTYPES[dtype]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, mesh=m, strategy=strategy, sequence_parallel=spar, dtype=dt, device=device)
    out: dict = {}

    def alloc() -> int:
        if not cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    # one layer, on this rank's [B, S/sp(/tp with SP), h] input
    local = seq_len // m.sp // (m.tp if model.sequence_parallel else 1)
    x = torch.randn(1, local, CONFIG.hidden_size, dtype=dt, device=device, requires_grad=True)
    pos = seqpar.position_ids(seq_len, mesh=m, device=device)
    kwargs = {"cu_seqlens": None, "seq_info": None, "window": None}
    before = alloc()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with saved_activations(exclude=model.parameters()) as saved:
        y = model.layers[0](x, pos, kwargs)
    graph = y.grad_fn  # keeps the saved tensors alive; the output itself is dropped
    del y
    out["layer_saved"] = saved.bytes
    if cuda:
        out["layer_retained"] = alloc() - before
        out["layer_peak"] = torch.cuda.max_memory_allocated() - before
    del graph
    if terms:  # a second forward: saved-tensor hooks do not nest (only the innermost one runs)
        src = _BySource(model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(src.pack, lambda t: t):
            model.layers[0](x, pos, kwargs)
        out["layer_terms"] = dict(src.rows)

    # whole model: forward + loss, on this rank's tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (1, seq_len), generator=g)
    ids_local = seqpar.shard(ids, 1, mesh=m).to(device)
    labels = seqpar.shard(torch.roll(ids, -1, 1), 1, mesh=m).to(device)
    before = alloc()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with saved_activations(exclude=model.parameters()) as saved:
        logits = model(ids_local)
        loss = causal_lm_loss(logits, labels, m).loss
    del logits
    out["model_saved"] = saved.bytes
    if cuda:
        out["model_retained"] = alloc() - before
        out["model_peak"] = torch.cuda.max_memory_allocated() - before
    del loss
    return out


#: memory settings (seqpar.core.recompute, the chunked loss) whose saved bytes the planner models
MEMORY_SETTINGS: dict[str, dict] = {
    "selective": {"recompute": "selective"},
    "full": {"recompute": "full"},
    "full, chains of 2": {"recompute": "full", "checkpoint_every": 2},
    "mlp tiles 4": {"mlp_tiles": 4},
    "selective + tiles": {"recompute": "selective", "mlp_tiles": 4},
    "loss chunks 256": {"loss_chunk": 256},
    "full + tiles + chunks": {"recompute": "full", "mlp_tiles": 4, "loss_chunk": 256},
}


def measure_setting(case: str, seq_len: int, setting: str, dtype: str = "float32") -> int:
    """Worker task: the bytes the whole model (forward + loss) saves on this rank with a memory setting."""
    from seqpar.train.loss import causal_lm_loss, global_token_mean

    _, degrees, strategy, spar = CASES[case]
    m = _mesh(degrees)
    mem = dict(MEMORY_SETTINGS[setting])
    chunk = mem.pop("loss_chunk", 0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, mesh=m, strategy=strategy, sequence_parallel=spar, dtype=DTYPES[dtype], **mem)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (1, seq_len), generator=g)
    ids_local = seqpar.shard(ids, 1, mesh=m)
    labels = seqpar.shard(torch.roll(ids, -1, 1), 1, mesh=m)
    with saved_activations(exclude=model.parameters()) as saved:
        if chunk:
            loss = global_token_mean(model(ids_local, labels=labels, loss_chunk=chunk), labels, m).loss
        else:
            loss = causal_lm_loss(model(ids_local), labels, m).loss
    del loss
    return saved.bytes


def predict_setting(case: str, seq_len: int, setting: str, dtype_bytes: int) -> int:
    """The planner's stored activation bytes for ``case`` with a memory setting (seqpar accounting)."""
    _, degrees, strategy, spar = CASES[case]
    tp, sp = degrees.get("tp", 1), degrees.get("sp", 1)
    if sp == 1:
        strategy = "none" if tp == 1 else "megatron"
    mem = MEMORY_SETTINGS[setting]
    return activation_memory(CONFIG, seq_len, 1, tp=tp, sequence_parallel=spar, dtype_bytes=dtype_bytes, sp=sp,
                             strategy=strategy, ulysses=degrees.get("ulysses") if strategy == "usp" else None,
                             implementation="seqpar", recompute=mem.get("recompute", "none"),
                             mlp_tiles=mem.get("mlp_tiles", 1), loss_chunk=mem.get("loss_chunk", 0),
                             checkpoint_every=mem.get("checkpoint_every", 1))


def setting_rows(seq_lens, settings, cases, runner, dtype: str = "float32") -> list[dict]:
    """Measured (max over ranks) and predicted saved bytes per (case, setting, S)."""
    out = []
    for case in cases:
        for setting in settings:
            for s in seq_lens:
                res = runner(CASES[case][0], measure_setting, case, s, setting, dtype)
                out.append({"case": case, "setting": setting, "seq_len": s, "measured": max(res),
                            "predicted": predict_setting(case, s, setting, DTYPES[dtype].itemsize)})
    return out


def setting_table(data: list[dict]) -> str:
    head = ["layout", "setting", "S", "predicted MiB", "measured MiB", "ratio", "diff bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data:
        lines.append("| " + " | ".join([r["case"], r["setting"], str(r["seq_len"]), _mb(r["predicted"]),
                                         _mb(r["measured"]), f"{r['measured'] / r['predicted']:.4f}",
                                         f"{r['measured'] - r['predicted']:+d}"]) + " |")
    return "\n".join(lines)


def predict(case: str, seq_len: int, dtype_bytes: int) -> dict:
    """The planner's per-GPU activation bytes for ``case``: seqpar accounting, and the paper's for reference."""
    _, degrees, strategy, spar = CASES[case]
    tp, sp = degrees.get("tp", 1), degrees.get("sp", 1)
    if sp == 1:
        strategy = "none" if tp == 1 else "megatron"
    kw = dict(micro_batch=1, tp=tp, sequence_parallel=spar, recompute="none", dtype_bytes=dtype_bytes, sp=sp,
              strategy=strategy, ulysses=degrees.get("ulysses") if strategy == "usp" else None)
    return {
        "layer": activation_memory_per_layer(CONFIG, seq_len, implementation="seqpar", **kw),
        "model": activation_memory(CONFIG, seq_len, implementation="seqpar", **kw),
        "layer_paper": activation_memory_per_layer(CONFIG, seq_len, attention_kernel="flash", dropout=False, **kw),
    }


def rows(seq_lens, dtype: str = "float32", device: str = "cpu", cases=None, runner=None, terms: bool = False):
    """Measured and predicted bytes per (case, S), max over ranks. ``runner(world, fn, *args)`` runs a task."""
    out = []
    for case in cases or CASES:
        world = CASES[case][0]
        for s in seq_lens:
            res = runner(world, measure, case, s, dtype, device, terms)
            meas = {k: max(r[k] for r in res) for k in res[0] if not k.endswith("terms")}
            row = {"case": case, "seq_len": s, "world": world, **meas,
                   **{f"pred_{k}": v for k, v in predict(case, s, DTYPES[dtype].itemsize).items()}}
            if terms:
                row["layer_terms"] = res[0]["layer_terms"]
            out.append(row)
    return out


def _mb(x: float) -> str:
    return f"{x / 2**20:.3f}"


def table(data: list[dict], device: str) -> str:
    """Markdown table: predicted vs measured MiB per GPU and their ratio."""
    head = ["layout", "S", "layer predicted MiB", "layer measured MiB", "ratio", "diff bytes", "model predicted MiB",
            "model measured MiB", "ratio", "diff bytes", "paper (flash) layer MiB"]
    if device == "cuda":
        head += ["layer retained MiB", "layer peak MiB", "model retained MiB", "model peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data:
        cells = [r["case"], str(r["seq_len"]), _mb(r["pred_layer"]), _mb(r["layer_saved"]),
                 f"{r['layer_saved'] / r['pred_layer']:.4f}", f"{r['layer_saved'] - r['pred_layer']:+d}",
                 _mb(r["pred_model"]), _mb(r["model_saved"]), f"{r['model_saved'] / r['pred_model']:.4f}",
                 f"{r['model_saved'] - r['pred_model']:+d}", _mb(r["pred_layer_paper"])]
        if device == "cuda":
            cells += [_mb(r["layer_retained"]), _mb(r["layer_peak"]), _mb(r["model_retained"]), _mb(r["model_peak"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                    help=f"layouts to run (default all): {', '.join(CASES)}")
    ap.add_argument("--terms", action="store_true", help="also print the measured layer bytes by source line")
    ap.add_argument("--settings", nargs="*", choices=list(MEMORY_SETTINGS), metavar="SETTING",
                    help=f"instead: the whole model's saved bytes with these memory settings (none given: all): "
                         f"{', '.join(MEMORY_SETTINGS)}")
    ns = ap.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to PyTorch")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plan_validation as this  # ranks unpickle tasks by module name: not "__main__"
    from seqpar.launch.pool import WorkerPool

    pools: dict[int, WorkerPool] = {}

    def runner(world, fn, *args):
        if world not in pools:
            pools[world] = WorkerPool(world)
        return pools[world].run(fn, *args)

    try:
        if ns.settings is not None:
            data = this.setting_rows(ns.seq_lens, ns.settings or list(MEMORY_SETTINGS), ns.cases, runner, ns.dtype)
            print(this.setting_table(data))
            worst = max(abs(r["measured"] / r["predicted"] - 1) for r in data)
            print(f"\nlargest |measured/predicted - 1|: {worst:.6f}")
            return 0
        data = this.rows(ns.seq_lens, ns.dtype, ns.device, ns.cases, runner, ns.terms)
    finally:
        for p in pools.values():
            p.close()
    c = CONFIG
    print(f"# model: h={c.hidden_size} heads={c.num_attention_heads} kv={c.kv_heads} d={c.d} ffn={c.ffn_hidden_size} "
          f"L={c.num_layers} vocab={c.vocab_size}; {ns.dtype} on {ns.device}; batch 1; bytes per rank (max over ranks)")
    print(table(data, ns.device))
    worst = max(max(abs(r["layer_saved"] / r["pred_layer"] - 1), abs(r["model_saved"] / r["pred_model"] - 1))
                for r in data)
    print(f"\nlargest |measured/predicted - 1|: {worst:.4f}")
    if ns.terms:
        for r in data:
            print(f"\n## {r['case']} S={r['seq_len']}: layer bytes by source line (rank 0)")
            for k, v in sorted(r["layer_terms"].items()):
                print(f"    {v:>12}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
