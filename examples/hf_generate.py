"""Long-prompt generation with a stock Hugging Face causal LM, its KV cache sharded over the sequence.

    torchrun --nproc-per-node 4 examples/hf_generate.py --model /path/to/llama --prompt-file long.txt
    python examples/hf_generate.py --nproc 4 --check      # CPU demo: tiny random Llama on local gloo ranks,
                                                          # checked against HF's own generate on one process

Every rank holds the whole model (``hf.apply`` changes only how attention runs).
``seqpar.inference.generate`` splits the prompt over the ranks (zigzag by default),
prefills it sequence-parallel (``--strategy``), keeps on each rank the keys and values
of its own tokens only, then decodes greedily: each new token's attention is computed
on every rank's shard and merged by log-sum-exp with one small all-gather per layer.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

import seqpar
from seqpar.launch.pool import run_on_ranks
from seqpar.inference import generate
from seqpar.integrations import hf


def load_model(name: str | None, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``name``: a local HF checkpoint (``from_pretrained``), or None for a tiny random Llama (no download)."""
    import transformers

    if name:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, torch_dtype=dtype, attn_implementation="sdpa")
    else:
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                          max_position_embeddings=1 << 16, attn_implementation="sdpa")
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval()


def prompt_ids(name: str | None, prompt_file: str | None, prompt_len: int, vocab: int) -> torch.Tensor:
    """``[1, S]`` token ids: the tokenized prompt file, or ``prompt_len`` random ids (seeded, the same on all ranks)."""
    if prompt_file:
        from transformers import AutoTokenizer

        text = Path(prompt_file).read_text()
        return AutoTokenizer.from_pretrained(name)(text, return_tensors="pt").input_ids
    return torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))


def run(model_name: str | None = None, prompt_file: str | None = None, prompt_len: int = 1000, new: int = 16,
        sp: int | None = None, ulysses: int = 1, strategy: str = "ring", layout: str = "zigzag",
        dtype: str = "float32", mesh: seqpar.Mesh | None = None, log: bool = True) -> torch.Tensor:
    """On this rank: prepare the model, generate ``new`` tokens after the prompt; return ``[1, S + new]`` ids.

    ``mesh`` (optional) replaces ``seqpar.init(sp=sp, ulysses=ulysses)``.
    """
    mesh = mesh if mesh is not None else seqpar.init(sp=sp, ulysses=ulysses)
    on_gpu = seqpar.mesh.on_cuda_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    model = hf.apply(load_model(model_name, getattr(torch, dtype), device), mesh, strategy=strategy, layout=layout)
    ids = prompt_ids(model_name, prompt_file, prompt_len, model.config.vocab_size).to(device)
    t0 = time.perf_counter()
    out = generate(model, ids, new)
    if log and mesh.rank("sp") == 0 and mesh.rank("dp") == 0:
        print(f"{ids.shape[1]} prompt tokens over sp={mesh.sp} ({strategy}, {layout}): {new} new tokens in "
              f"{time.perf_counter() - t0:.2f} s; new ids {out[0, ids.shape[1]:].tolist()}", flush=True)
    return out.cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF checkpoint (default: a tiny random Llama)")
    p.add_argument("--prompt-file", default=None, help="text file to use as the prompt (needs --model)")
    p.add_argument("--prompt-len", type=int, default=1000, help="random prompt length without --prompt-file")
    p.add_argument("--new", type=int, default=16, help="tokens to generate")
    p.add_argument("--nproc", type=int, default=4, help="local CPU ranks when not launched by torchrun")
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--strategy", default="ring", choices=seqpar.STRATEGIES)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "stripe"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--check", action="store_true", help="compare with HF's generate on one process")
    a = p.parse_args(argv)
    if a.prompt_file and not a.model:
        p.error("--prompt-file needs --model (its tokenizer)")
    kw = dict(model_name=a.model, prompt_file=a.prompt_file, prompt_len=a.prompt_len, new=a.new,
              ulysses=a.ulysses, strategy=a.strategy, layout=a.layout, dtype=a.dtype)
    # Ranks import functions by reference: import this file as a module (its folder is sys.path[0]).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mod = importlib.import_module(Path(__file__).stem)
    # under torchrun this process is one rank; otherwise a pool of --nproc local CPU ranks
    ours = run_on_ranks(mod.run, a.nproc, **kw)[0]
    if "WORLD_SIZE" in os.environ:
        return 0
    if a.check:
        ref = reference(a.model, a.prompt_file, a.prompt_len, a.new, a.dtype)
        same = torch.equal(ours, ref)
        print(f"HF generate on one process: {'the same tokens' if same else 'DIFFERENT tokens: ' + str(ref.tolist())}")
        return 0 if same else 1
    return 0


def reference(model_name: str | None, prompt_file: str | None, prompt_len: int, new: int,
              dtype: str = "float32") -> torch.Tensor:
    """HF's own greedy ``generate`` (its KV cache, sdpa) on one process: ``[1, S + new]``."""
    model = load_model(model_name, getattr(torch, dtype), torch.device("cpu"))
    ids = prompt_ids(model_name, prompt_file, prompt_len, model.config.vocab_size)
    # an explicit all-ones mask: without one HF takes every pad_token_id (0) in the prompt for padding
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


if __name__ == "__main__":
    sys.exit(main())
