"""Peak memory per rank of one training step, measured on CPU, against the planner's prediction.

For a small Llama (``CONFIG``: the shape ratios of Llama 3, vocabulary 32x the width) on 4 local
ranks (ring attention, zigzag), at growing sequence lengths, with each memory setting off and on
(``SETTINGS``: recomputation, host offload, tiled MLP, chunked loss, ZeRO-3), this measures the
peak bytes each rank holds during one training step (forward, loss, backward, gradient sync,
clipping, AdamW step) and prints it next to :func:`seqpar.plan.evaluate`'s ``memory.peak`` for the
same configuration (``implementation="seqpar"``, float32: 4-byte parameters and gradients,
8 bytes of AdamW moments per parameter), and the slope (bytes per extra token) of both.

Method: the CPU allocator's own count.  With ``torch.profiler`` memory profiling on, PyTorch's
CPU allocator reports every allocation and free it serves (``[memory]`` events, signed sizes, in
order), counting only blocks allocated while profiling.  The step is profiled after a first,
unprofiled step (so the optimizer state exists, as in steady training); the running sum of the
events is the bytes allocated by the step and still alive; its maximum, plus the bytes alive
before the step (parameters and optimizer state, summed from the tensors themselves), is the
rank's peak.  This counts every tensor (activations, gradients, temporaries, communication
buffers PyTorch allocates), not only saved activations; it misses only memory outside PyTorch's
allocator (gloo's own buffers, the Python heap), which the planner does not model either.  One
caveat, ZeRO-3 on gloo: a rank may keep the root unit's all-gather buffer (embedding and LM head)
through the loss's backward, freeing it later, when gloo's threads let go of it; which rank does
varies from run to run.  The planner counts that buffer.

On CPU, host and device memory are one: an offloaded checkpoint still counts, so the offload rows
are compared with the same run's prediction without offload (its host copy replaces the device
one).  ``--device cuda`` (every rank on cuda:0 over gloo) measures ``max_memory_allocated`` and
compares it with the device prediction as is.

Examples::

    python benchmarks/memory_peak.py                                  # the sweep of BENCHMARKS.md
    python benchmarks/memory_peak.py --seq-lens 4096 --settings plain "loss chunks" --phases
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

import seqpar
from seqpar.core.configs import ModelConfig

#: Llama-3-like ratios (GQA 4:1, SwiGLU width 2.75h, vocabulary 32h), small enough for a CPU sweep;
#: attention narrow (4 heads of 16) because the CPU's attention time, not memory, limits the lengths
CONFIG = ModelConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_layers=2,
                     ffn_hidden_size=352, vocab_size=4096, name="peak-validation")

#: name -> TrainConfig-style memory settings
SETTINGS: dict[str, dict] = {
    "plain": {},
    "selective": {"recompute": "selective"},
    "full": {"recompute": "full"},
    "full+offload": {"recompute": "full", "offload": True},
    "mlp tiles 4": {"mlp_tiles": 4},
    "loss chunks 1024": {"loss_chunk": 1024},
    "zero 3": {"zero_stage": 3},
    "full, tiles, chunks": {"recompute": "full", "mlp_tiles": 4, "loss_chunk": 1024},
    "all": {"recompute": "full", "offload": True, "mlp_tiles": 4, "loss_chunk": 1024, "zero_stage": 3},
}
WORLD = 4
DEGREES = {"sp": 4}
STRATEGY = "ring"

_MESHES: dict = {}


def _mesh(degrees: dict, device: str = "cpu") -> seqpar.Mesh:
    key = (tuple(sorted(degrees.items())), device)
    if key not in _MESHES:  # FSDP2 wants the mesh on the parameters' device type
        _MESHES[key] = seqpar.init(**degrees, device_type=device)
    seqpar.set_mesh(_MESHES[key])
    return _MESHES[key]


def _step(model, opt, mesh, ids, labels, chunk: int, phases: bool) -> None:
    from torch.profiler import record_function

    from seqpar.train import causal_lm_loss, global_token_mean
    from seqpar.train.fsdp import clip_gradients, reduce_gradients

    with record_function("PHASE forward"):
        if chunk:
            out = global_token_mean(model(ids, labels=labels, loss_chunk=chunk), labels, mesh)
        else:
            out = causal_lm_loss(model(ids), labels, mesh)
    with record_function("PHASE backward"):
        out.loss.backward()
    with record_function("PHASE optimizer"):
        reduce_gradients(model, mesh)
        clip_gradients(model, 1.0, mesh)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _local_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure(seq_len: int, setting: str, degrees: dict = DEGREES, strategy: str = STRATEGY,
            phases: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    """Worker task: this rank's peak bytes over one profiled training step (see the module docstring).

    ``device="cuda"``: every rank on cuda:0 (gloo); the peak is ``torch.cuda.max_memory_allocated()``
    over the step, above nothing (the allocator counts parameters and optimizer state too).
    """
    from torch.profiler import ProfilerActivity, profile

    from seqpar.models import LlamaForCausalLM
    from seqpar.train import shift_labels
    from seqpar.train.fsdp import shard_model

    m = _mesh(degrees, device)
    s = SETTINGS[setting]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, mesh=m, strategy=strategy, recompute=s.get("recompute", "none"),
                             offload=s.get("offload", False), mlp_tiles=s.get("mlp_tiles", 1),
                             dtype=getattr(torch, dtype), device=device)
    model.init_weights(0)
    if s.get("zero_stage"):
        shard_model(model, m, zero_stage=s["zero_stage"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, CONFIG.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    ids_l = seqpar.shard(ids, 1, mesh=m).to(device)
    labels_l = seqpar.shard(shift_labels(ids), 1, mesh=m, pad_value=-100).to(device)
    chunk = s.get("loss_chunk", 0)
    _step(model, opt, m, ids_l, labels_l, chunk, phases)  # optimizer state exists from here on
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _step(model, opt, m, ids_l, labels_l, chunk, phases)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"resident": 0, "step_peak": peak, "peak": peak, "seconds": time.perf_counter() - start}
    resident = _local_bytes([*model.parameters(), *(v for st in opt.state.values() for v in st.values()
                                                     if torch.is_tensor(v))])
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, m, ids_l, labels_l, chunk, phases)
    seconds = time.perf_counter() - start
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running = peak = 0
    totals = []
    for _, n in mem:
        running += n
        totals.append(running)
        peak = max(peak, running)
    out = {"resident": resident, "step_peak": peak, "peak": resident + peak, "seconds": seconds}
    if phases:
        import bisect

        times = [t for t, _ in mem]
        for e in events:
            if e.name().startswith("PHASE"):
                i = bisect.bisect_left(times, e.start_ns())
                j = bisect.bisect_right(times, e.start_ns() + e.duration_ns())
                before = totals[i - 1] if i else 0
                out[e.name()[6:]] = {"before": before, "peak": max(totals[i:j], default=before),
                                     "after": totals[j - 1] if j else 0}
    return out


def predict(seq_len: int, setting: str, degrees: dict = DEGREES, strategy: str = STRATEGY, cpu: bool = True,
            dtype_bytes: int = 4):
    """The planner's :class:`~seqpar.plan.Candidate` for the same run (weights, gradients and AdamW's
    moments in the model dtype, as ``seqpar train`` keeps them).

    ``cpu``: host and device memory are one, so an offloaded checkpoint stays in the count: the
    comparable prediction is the same run without offload (the host copy replaces the device one).
    """
    s = dict(SETTINGS[setting])
    if cpu:
        s["offload"] = False
    sp = degrees.get("sp", 1)
    return seqpar.plan.evaluate(
        CONFIG, seq_len, strategy=strategy if sp > 1 else None, sp=sp, tp=degrees.get("tp", 1),
        dp=degrees.get("dp", 1), implementation="seqpar", dtype_bytes=dtype_bytes, param_bytes=dtype_bytes,
        grad_bytes=dtype_bytes, optimizer_bytes=2 * dtype_bytes, attention_kernel="flash",
        recompute=s.get("recompute", "none"), offload=s.get("offload", False), mlp_tiles=s.get("mlp_tiles", 1), loss_chunk=s.get("loss_chunk", 0),
        zero_stage=s.get("zero_stage", 0))


def rows(seq_lens, settings, runner, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    """Measured (max over ranks) and predicted peak per (setting, S). ``runner(world, fn, *args)`` runs a task."""
    out = []
    for name in settings:
        for s in seq_lens:
            res = runner(WORLD, measure, s, name, DEGREES, STRATEGY, False, device, dtype)
            pred = predict(s, name, cpu=device == "cpu", dtype_bytes=getattr(torch, dtype).itemsize)
            out.append({"setting": name, "seq_len": s, "measured": max(r["peak"] for r in res),
                        "predicted": pred.memory.peak, "seconds": max(r["seconds"] for r in res)})
    return out


def table(data: list[dict]) -> str:
    head = ["setting", "S", "measured MiB", "predicted MiB", "ratio", "measured B/token", "predicted B/token",
            "slope ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prev: dict = {}
    for r in data:
        p = prev.get(r["setting"])
        if p is not None:
            dm = (r["measured"] - p["measured"]) / (r["seq_len"] - p["seq_len"])
            dp = (r["predicted"] - p["predicted"]) / (r["seq_len"] - p["seq_len"])
            slope = [f"{dm:.1f}", f"{dp:.1f}", f"{dm / dp:.4f}"]
        else:
            slope = ["", "", ""]
        lines.append("| " + " | ".join([r["setting"], str(r["seq_len"]), f"{r['measured'] / 2**20:.2f}",
                                         f"{r['predicted'] / 2**20:.2f}", f"{r['measured'] / r['predicted']:.4f}",
                                         *slope]) + " |")
        prev[r["setting"]] = r
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--phases", action="store_true", help="print each rank's bytes per phase (analysis)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: every rank on cuda:0 over gloo, the peak from max_memory_allocated")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ns = ap.parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to PyTorch")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory_peak as this  # ranks unpickle tasks by module name: not "__main__"

    from seqpar.launch.pool import WorkerPool

    pool = WorkerPool(WORLD, timeout=3600)
    try:
        if ns.phases:
            for name in ns.settings:
                for s in ns.seq_lens:
                    res = pool.run(this.measure, s, name, DEGREES, STRATEGY, True)
                    print(name, s, json.dumps(res[0]))
            return 0
        data = this.rows(ns.seq_lens, ns.settings, lambda world, fn, *args: pool.run(fn, *args), ns.device, ns.dtype)
    finally:
        pool.close()
    c = CONFIG
    print(f"# {c.name}: h={c.hidden_size} heads={c.num_attention_heads} kv={c.kv_heads} d={c.d} "
          f"ffn={c.ffn_hidden_size} L={c.num_layers} vocab={c.vocab_size}; {ns.dtype} on {ns.device}, AdamW, {WORLD} ranks, "
          f"{STRATEGY} sp={DEGREES.get('sp')}; peak bytes per rank (max over ranks)")
    print(table(data))
    if ns.json:
        Path(ns.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
