"""``seqpar generate``: long-prompt generation with a Hugging Face causal LM, its KV cache sharded over the ranks.

    torchrun --nproc-per-node 8 -m seqpar.cli generate --model /path/to/llama --prompt-file long.txt
    seqpar generate --nproc 4 --prompt-len 4000 --check       # CPU: a tiny random Llama on local gloo ranks,
                                                              # checked against HF's generate on one process

Every rank loads the whole model; :func:`seqpar.integrations.hf.apply` routes its attention
through seqpar; :func:`seqpar.inference.generate` prefills the prompt sequence-parallel and
decodes with each rank holding the keys/values of its own tokens only.  Rank 0 prints the
continuation (text when the model directory has a tokenizer, else ids), the prefill time,
the decode rate and the KV cache each rank holds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ..core.errors import ConfigError, SeqParError
from .progress import Progress, fail, mesh_rank, peak_mem_mb

__all__ = ["add_parser", "generate_worker"]

#: the model used without --model: small and random, for trying the command and --check
TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, vocab_size=256)


def _load(ns: dict, device):
    """(model, tokenizer or None) on ``device``: ``ns["model"]`` from_pretrained, else the tiny random Llama."""
    import torch
    import transformers

    dtype = getattr(torch, ns["dtype"])
    if ns["model"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(ns["model"], torch_dtype=dtype,
                                                                  attn_implementation="sdpa")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(ns["model"])
        except (OSError, ValueError):  # a checkpoint without a tokenizer: print ids
            tok = None
    else:
        torch.manual_seed(ns["seed"])
        extra: dict[str, Any] = {"max_position_embeddings": max(4096, 2 * ns["prompt_len"]),
                                 "attn_implementation": "sdpa"}
        config = transformers.LlamaConfig(**TINY, **extra)
        model, tok = transformers.LlamaForCausalLM(config).to(dtype), None
    return model.to(device).eval(), tok


def _prompt(ns: dict, tok, vocab: int):
    """``[1, S]`` ids: the tokenized --prompt / --prompt-file, or --prompt-len seeded random ids."""
    import torch

    text = ns["prompt"] if ns["prompt"] is not None else (
        open(ns["prompt_file"], encoding="utf-8").read() if ns["prompt_file"] else None)
    if text is not None:
        if tok is None:
            raise SeqParError("a text prompt needs a tokenizer: give --model a directory with one, or --prompt-len")
        return tok(text, return_tensors="pt").input_ids
    return torch.randint(0, vocab, (1, ns["prompt_len"]), generator=torch.Generator().manual_seed(ns["seed"]))


def generate_worker(ns: dict) -> dict:
    """One rank: load, prepare, generate; returns the ids and this rank's timings and cache size."""
    import torch

    import seqpar

    from ..core.mesh import on_cuda_backend
    from ..inference import Sampler, decode, prefill
    from ..integrations import hf

    mesh = seqpar.init(ulysses=ns["ulysses"])
    on_gpu = on_cuda_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device(ns["device"])
    model, tok = _load(ns, device)
    hf.apply(model, mesh, strategy=ns["strategy"], layout=ns["layout"])
    ids = _prompt(ns, tok, model.config.vocab_size).to(device)
    sampler = Sampler(ns["do_sample"], ns["temperature"], ns["top_k"], ns["top_p"], ns["seed"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # rank 0 shows the two phases on stderr (stdout carries the result)
    bar = Progress(2, "generate", unit="phase", stream=sys.stderr) if mesh_rank() == 0 else None
    if bar:
        bar.line({"step": 0, "what": f"prefill of {ids.shape[1]} tokens over sp={mesh.sp}"})
    sync()
    t0 = time.perf_counter()
    cache, logits = prefill(model, ids, reserve=ns["max_new_tokens"])
    sync()
    t1 = time.perf_counter()
    kv = cache.nbytes()  # after prefill: the prompt's share
    if bar:
        bar.line({"step": 1, "what": f"decode of up to {ns['max_new_tokens']} tokens",
                  "tokens_per_s": ids.shape[1] / max(t1 - t0, 1e-9), "peak_mem_mb": peak_mem_mb(device.type)})
    new = decode(model, cache, logits, ns["max_new_tokens"], sampler=sampler, eos_token_id=ns["eos"])
    sync()
    t2 = time.perf_counter()
    if bar:
        bar.step({"step": 2, "what": f"{new.shape[1]} new tokens", "tokens_per_s": new.shape[1] / max(t2 - t1, 1e-9),
                  "peak_mem_mb": peak_mem_mb(device.type)})
        bar.close()
    text = tok.decode(new[0]) if tok is not None else None
    return {"ids": torch.cat([ids, new], 1).cpu(), "prompt_len": ids.shape[1], "prefill": t1 - t0,
            "decode": t2 - t1, "kv": kv, "text": text, "sp": mesh.sp, "device": device.type}


def _report(ns: argparse.Namespace, results: list[dict]) -> None:
    r = results[0]
    new = r["ids"].shape[1] - r["prompt_len"]
    decode = max(x["decode"] for x in results)
    print(f"{r['prompt_len']} prompt tokens over sp={r['sp']} ranks ({ns.strategy}, {ns.layout}, {r['device']}, "
          f"{ns.dtype}): prefill {max(x['prefill'] for x in results) * 1e3:.0f} ms, {new} new tokens"
          + (f" at {max(new - 1, 0) / decode:.1f} tokens/s" if decode > 0 and new > 1 else "")
          + f"; KV cache per rank {max(x['kv'] for x in results) / 2**20:.2f} MiB "
            f"(all ranks {sum(x['kv'] for x in results) / 2**20:.2f} MiB)")
    print(r["text"] if r["text"] is not None else f"new ids: {r['ids'][0, r['prompt_len']:].tolist()}", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _in_hf_cache(name: str) -> bool:
    """``name`` (``org/model``) has a config.json in the local Hugging Face cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed name: not in the cache
        return False


def _validate(ns: argparse.Namespace) -> None:
    """Mistakes named with their fix before any process starts."""
    if ns.prompt is not None and ns.prompt_file:
        raise SeqParError("give --prompt or --prompt-file, not both")
    if (ns.prompt is not None or ns.prompt_file) and not ns.model:
        raise SeqParError("a text prompt needs --model (its tokenizer); without --model use --prompt-len")
    if ns.check and (ns.do_sample or ns.model or ns.prompt or ns.prompt_file):
        raise SeqParError("--check compares greedy generation of the tiny random model with HF's generate: "
                          "drop --do-sample, --model and the text prompt")
    from ..inference import Sampler

    Sampler(ns.do_sample, ns.temperature, ns.top_k, ns.top_p, ns.seed)  # bad sampling flags, named here
    if ns.max_new_tokens < 1 or ns.prompt_len < 1:
        raise SeqParError("--max-new-tokens and --prompt-len must be >= 1")
    if ns.prompt_file and not os.path.isfile(ns.prompt_file):
        raise ConfigError(f"--prompt-file {ns.prompt_file!r} does not exist (relative to {os.getcwd()!r})")
    if ns.model and not os.path.isdir(ns.model) and not _in_hf_cache(ns.model):
        raise ConfigError(f"--model {ns.model!r} is neither a directory nor a model in the local Hugging Face cache: "
                          f"give the directory holding config.json and the weights")
    if getattr(ns, "device", "cpu") == "cuda" and not _cuda():
        raise ConfigError("--device cuda but this machine has no CUDA device: drop --device (CPU), or run where a "
                          "GPU and a CUDA build of torch are")
    # under torchrun the world is WORLD_SIZE ranks (--nproc is for local ranks only)
    world, what = (int(os.environ["WORLD_SIZE"]), "the world size") if "WORLD_SIZE" in os.environ else \
        (ns.nproc, "--nproc")
    if world < 1 or world % ns.ulysses:
        raise SeqParError(f"{what} {world} is not divisible by --ulysses {ns.ulysses}")
    if ns.strategy == "usp" and not 1 < ns.ulysses < world:
        raise SeqParError(f"--strategy usp needs 1 < --ulysses < {what} ({world}: a 2-D mesh), got --ulysses "
                          f"{ns.ulysses}")


def run(ns: argparse.Namespace) -> int:
    try:
        _validate(ns)
    except SeqParError as e:
        return fail("generate", e, quiet=int(os.environ.get("RANK", "0")) != 0)
    keys = ("model", "prompt", "prompt_file", "prompt_len", "max_new_tokens", "strategy", "layout", "ulysses",
            "dtype", "device", "do_sample", "temperature", "top_k", "top_p", "seed", "eos")
    cfg = {k: getattr(ns, k) for k in keys}
    from ..launch.pool import run_on_ranks

    results = run_on_ranks(generate_worker, ns.nproc, cfg, timeout=3600)  # torchrun's ranks, or local ones
    if "WORLD_SIZE" in os.environ:  # each torchrun rank got every rank's results: global rank 0 reports
        if int(os.environ.get("RANK", 0)) == 0:
            _report(ns, results)
        return 0
    _report(ns, results)
    if not ns.check:
        return 0
    import torch

    model, _ = _load(cfg, torch.device("cpu"))
    ids = _prompt(cfg, None, model.config.vocab_size)
    # an explicit all-ones mask: without one HF takes every pad_token_id in the prompt for padding
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ns.max_new_tokens,
                          do_sample=False, eos_token_id=ns.eos, pad_token_id=ns.eos if ns.eos is not None else 0)
    same = all(torch.equal(r["ids"], want) for r in results)
    print("HF generate on one process: " + ("the same tokens" if same else f"DIFFERENT tokens: {want.tolist()}"))
    return 0 if same else 1


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from a long prompt with an HF model, KV cache sharded over "
                                        "the ranks (torchrun, or local CPU ranks)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or name in the local cache "
                                                 "(default: a tiny random Llama)")
    p.add_argument("--prompt", default=None, help="prompt text (needs --model's tokenizer)")
    p.add_argument("--prompt-file", default=None, help="file whose text is the prompt")
    p.add_argument("--prompt-len", type=int, default=1000, help="random prompt of this many tokens (no text)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--strategy", default="ring", choices=("ring", "ulysses", "allgather", "usp"))
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous", "stripe"))
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="for local ranks (under torchrun with GPUs each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--nproc", type=int, default=4, help="local ranks when not launched by torchrun")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos", type=int, default=None, help="token id that ends a sequence")
    p.add_argument("--check", action="store_true", help="compare with HF's generate on one process (tiny model)")
    p.set_defaults(func=run)
