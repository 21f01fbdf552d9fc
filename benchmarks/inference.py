"""Sequence-parallel inference against one device: prefill time, KV-cache memory per rank, decode latency.

``--nproc`` local ranks (gloo; with ``--device cuda`` every rank shares cuda:0) run
:func:`seqpar.inference.prefill` on the prompt and then ``--decode-tokens`` steps of
:func:`seqpar.inference.decode_step`.  The one-device baseline is the same model and the
same code on a world-1 mesh (a full, unsharded KV cache), timed on rank 0 of the same
pool, so it gets the compute of one rank (``--threads`` torch threads).  Reported:

* prefill: milliseconds (max over ranks, median of ``--reps``), and the one-device time over it;
* KV cache: MB held per rank against the one device's whole cache (the capacity argument);
* decode: milliseconds per token (max over ranks, median over the decoded tokens).

``--model hf`` runs a Hugging Face ``transformers`` Llama of the same sizes prepared by
``seqpar.integrations.hf.apply``; its one-device baseline is then the stock HF model
(sdpa attention, HF's own ``DynamicCache``), i.e. what an HF user runs today.  ``--window W``
makes it a Mistral with a sliding window of ``W`` on every layer (both caches then keep
about ``W`` tokens per layer).

Examples::

    python benchmarks/inference.py --nproc 2 --prompt-lens 512 1024 2048 4096 8192
    python benchmarks/inference.py --model hf --nproc 2 --prompt-lens 1024 4096
    python benchmarks/inference.py --device cuda --dtype bfloat16 --nproc 4 --hidden 2048 --heads 16 \\
        --kv-heads 4 --layers 8 --prompt-lens 8192 32768
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _model_config(cfg: dict):
    from seqpar.core.configs import ModelConfig

    return ModelConfig(hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                       num_layers=cfg["layers"], ffn_hidden_size=cfg["ffn"], vocab_size=cfg["vocab"], name="bench")


def _measure(model, ids, mesh, cfg: dict, barrier) -> dict:
    """Prefill (median of reps) and per-token decode latency of ``model`` on ``mesh``."""
    from seqpar.inference import decode_step, prefill
    from seqpar.tp.cross_entropy import vocab_parallel_argmax

    device = cfg["device"]
    times, cache, logits = [], None, None
    for _ in range(cfg["reps"] + 1):  # the first run warms up (connections, allocator, kernels)
        cache = logits = None
        barrier()
        _sync(device)
        t0 = time.perf_counter()
        cache, logits = prefill(model, ids, mesh, cfg["strategy"], layout=cfg["layout"], reserve=cfg["decode_tokens"])
        _sync(device)
        times.append(time.perf_counter() - t0)
    kv = cache.nbytes()
    steps = []
    barrier()
    for _ in range(cfg["decode_tokens"]):
        nxt = vocab_parallel_argmax(logits, group=mesh.tp_group)
        _sync(device)
        t0 = time.perf_counter()
        logits = decode_step(model, cache, nxt)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"prefill": statistics.median(times[1:]), "kv": kv, "decode": statistics.median(steps[1:] or steps),
            "peak": peak}


def _hf_model(cfg: dict, dtype, device):
    """A transformers Llama of the benchmark's sizes, or a Mistral (sliding window on every layer) with --window."""
    import transformers

    sizes = dict(hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                 num_hidden_layers=cfg["layers"], intermediate_size=cfg["ffn"], vocab_size=cfg["vocab"],
                 max_position_embeddings=max(8192, 2 * cfg["prompt_len"]), attn_implementation="sdpa")
    torch.manual_seed(0)
    if cfg["window"]:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**sizes, sliding_window=cfg["window"]))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    return model.to(device=device, dtype=dtype).eval()


def _kv_bytes(hf_cache) -> int:
    """Bytes of keys and values in an HF cache (transformers 5: .layers; 4.x: .key_cache/.value_cache)."""
    layers = getattr(hf_cache, "layers", None)
    if layers is not None:
        pairs = [(x.keys, x.values) for x in layers]
    else:
        pairs = list(zip(hf_cache.key_cache, hf_cache.value_cache))
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in pairs)


def _measure_hf_native(model, ids, cfg: dict) -> dict:
    """The stock HF model on one device: prefill with its DynamicCache, then cached decode steps."""
    import inspect

    device = cfg["device"]
    # transformers 5 renamed past_key_values to cache (the old name warns)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times = []
    with torch.no_grad():
        for _ in range(cfg["reps"] + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        cache, logits, steps = getattr(out, key), out.logits[:, -1], []
        kv = _kv_bytes(cache)  # after prefill, as for seqpar
        for _ in range(cfg["decode_tokens"]):
            nxt = logits.argmax(-1, keepdim=True)
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, **{key: cache})
            _sync(device)
            steps.append(time.perf_counter() - t0)
            cache, logits = getattr(out, key), out.logits[:, -1]
    return {"prefill": statistics.median(times[1:]), "kv": kv,
            "decode": statistics.median(steps[1:] or steps), "peak": None}


def bench_rank(cfg: dict) -> dict:
    """Worker task: sequence-parallel numbers on every rank, then the one-device baseline on rank 0."""
    import torch.distributed as dist

    import seqpar
    from seqpar.core.mesh import Mesh
    from seqpar.models import LlamaForCausalLM

    device, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    if device == "cuda":
        torch.cuda.set_device(0)
    mesh = seqpar.get_mesh() or seqpar.init(ulysses=cfg["ulysses"])
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["prompt_len"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    hf = cfg["model"] == "hf"
    if hf:
        from seqpar.integrations.hf import apply

        model = apply(_hf_model(cfg, dtype, device), mesh, strategy=cfg["strategy"], layout=cfg["layout"])
    else:
        model = LlamaForCausalLM(_model_config(cfg), mesh=mesh, strategy=cfg["strategy"], layout=cfg["layout"],
                                 dtype=dtype, device=device)
        model.init_weights(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"sp": _measure(model, ids, mesh, cfg, dist.barrier)}
    del model
    dist.barrier()
    if mesh.rank("sp") == 0 and dist.get_rank() == 0 and hf:
        out["single"] = _measure_hf_native(_hf_model(cfg, dtype, device), ids, cfg)
    elif mesh.rank("sp") == 0 and dist.get_rank() == 0:
        single = LlamaForCausalLM(_model_config(cfg), mesh=Mesh(), strategy="ring", layout="contiguous",
                                  dtype=dtype, device=device)
        single.init_weights(0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cfg1 = dict(cfg, strategy="ring", layout="contiguous")
        out["single"] = _measure(single, ids, Mesh(), cfg1, lambda: None)
    dist.barrier()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="seqpar", choices=("seqpar", "hf"),
                   help="seqpar's reference Llama, or a transformers Llama (baseline: stock HF on one device)")
    p.add_argument("--window", type=int, default=0,
                   help="(--model hf) a Mistral with this sliding window on every layer instead of a Llama")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree (with --strategy usp)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the one device)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--strategy", default="ring")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    ns = p.parse_args()

    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ranks import this file as a module
    import inference as this  # noqa: F401  (the module the ranks import)
    from seqpar.launch.pool import WorkerPool

    print(f"`python benchmarks/inference.py {shlex.join(sys.argv[1:])}`\n")
    what = f"{ns.model} model" + (f" (Mistral, window {ns.window})" if ns.window else "")
    print(f"# {what}; {ns.nproc} ranks on {ns.device} (gloo, {ns.threads} thread(s) each) vs one device "
          f"({ns.threads} "
          f"thread(s)); {ns.dtype}; h={ns.hidden} heads={ns.heads} kv={ns.kv_heads} layers={ns.layers} "
          f"vocab={ns.vocab} B={ns.batch}; prefill {ns.strategy}/{ns.layout}, median of {ns.reps}; decode median "
          f"of {ns.decode_tokens} tokens")
    cuda = ns.device == "cuda"
    print("| prompt | prefill ms (1 dev) | prefill ms (SP) | speed-up | KV MB (1 dev) | KV MB/rank (SP) | "
          "decode ms/token (1 dev) | decode ms/token (SP) |" + (" peak MB/rank (SP) |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    with WorkerPool(ns.nproc, threads_per_rank=ns.threads, timeout=1800.0) as pool:
        for s in ns.prompt_lens:
            cfg = {k: getattr(ns, k) for k in ("model", "window", "device", "dtype", "ulysses", "strategy", "layout",
                                               "batch", "hidden", "heads", "kv_heads", "layers", "ffn", "vocab",
                                               "decode_tokens", "reps")}
            cfg["prompt_len"] = s
            res = pool.run(this.bench_rank, cfg)
            one = res[0]["single"]
            pre = max(r["sp"]["prefill"] for r in res)
            kv = max(r["sp"]["kv"] for r in res)
            dec = max(r["sp"]["decode"] for r in res)
            line = (f"| {s} | {one['prefill'] * 1e3:.0f} | {pre * 1e3:.0f} | {one['prefill'] / pre:.2f} | "
                    f"{one['kv'] / 2**20:.1f} | {kv / 2**20:.1f} | {one['decode'] * 1e3:.1f} | {dec * 1e3:.1f} |")
            if cuda:
                line += f" {max(r['sp']['peak'] for r in res) / 2**20:.0f} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
