"""Sequence-parallel training of a stock Hugging Face Llama with seqpar (tiny model from a config, no download).

    torchrun --nproc-per-node 4 examples/hf_train.py --sp 2       # dp = world / sp = 2, on GPUs (nccl) or CPU
    python examples/hf_train.py --nproc 4 --sp 2 --check          # CPU demo on local gloo ranks, checked
                                                                  # against one process on the global batch

Every rank holds the whole model. Each data-parallel group of ``sp`` ranks reads
one batch of packed documents (the same on its sp ranks), ``shard_batch`` gives
each rank its share of every document, attention runs over the whole sequence
through seqpar (``--strategy``), and DDP over ``mesh.dp_sp_group`` averages the
gradients of the scaled loss from ``causal_lm_loss``: the update is exactly
that of one process on the global batch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import seqpar
from seqpar.launch.pool import run_on_ranks
from seqpar.integrations import hf

VOCAB = 256


def tiny_llama(seed: int = 0, attn: str = "sdpa"):
    """A 2-layer Llama (GQA: 4 heads, 2 kv heads) with weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=4096,
                         attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


#: the rule the data follows: the token after t is NEXT[t] (a fixed random permutation), learnable quickly
NEXT = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234))


def make_batch(step: int, dp_rank: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full sequences of one dp rank: ``batch`` rows packed alike with 4 documents of random lengths.

    Each document starts at a random token and follows ``NEXT``; ``position_ids``
    restart at 0 at every document (packing), so the first token of a document
    is not predictable from the previous document and gets no target.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + dp_rank)
    cuts = sorted(torch.randperm(seq_len - 1, generator=g)[:3].add(1).tolist())
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, seq_len])]
    ids = torch.empty(batch, seq_len, dtype=torch.long)
    start = 0
    for n in lens:
        tok = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(start, start + n):
            ids[:, t] = tok
            tok = NEXT[tok]
        start += n
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def train(sp: int = 2, ulysses: int = 1, strategy: str = "ring", layout: str = "zigzag", steps: int = 5,
          seq_len: int = 128, batch: int = 2, lr: float = 1e-2, seed: int = 0, mesh: seqpar.Mesh | None = None,
          log: bool = True) -> list[float]:
    """Train on this rank; return the global token-mean loss of every step (the same on every rank).

    ``mesh`` (optional) replaces ``seqpar.init(sp=sp, ulysses=ulysses)``; dp is world / sp.
    """
    mesh = mesh if mesh is not None else seqpar.init(sp=sp, ulysses=ulysses)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    on_gpu = seqpar.mesh.on_cuda_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    model = tiny_llama(seed).to(device)
    hf.apply(model, mesh, strategy=strategy, layout=layout)
    # Parameters are replicated over dp *and* sp: DDP averages their gradients over both (see causal_lm_loss).
    ddp = DistributedDataParallel(model, process_group=mesh.dp_sp_group) if mesh.dp * mesh.sp > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        full = make_batch(step, mesh.rank("dp"), batch, seq_len, seed)  # identical on this dp rank's sp ranks
        local = hf.shard_batch({k: v.to(device) for k, v in full.items()}, mesh, layout)
        labels = local.pop("labels")  # shifted before sharding; without labels HF computes no (local) loss
        del local["shift_labels"]
        out = ddp(**local)  # input_ids, position_ids (RoPE), seqpar_info (packing) -> logits [B, S/sp, V]
        loss = hf.causal_lm_loss(out.logits, labels, mesh)
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()  # DDP all-reduces (averages) the gradients over mesh.dp_sp_group
        opt.step()
        losses.append(float(loss.value))
        if log and rank == 0:
            print(f"step {step}: loss {losses[-1]:.4f} ({int(loss.tokens)} tokens, "
                  f"{time.perf_counter() - t0:.2f} s)", flush=True)
    return losses


def reference(dp: int, steps: int = 5, seq_len: int = 128, batch: int = 2, lr: float = 1e-2, seed: int = 0
              ) -> list[float]:
    """The same training in one process on the global batch (every dp rank's rows), plain HF sdpa attention."""
    model = tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        parts = [make_batch(step, d, batch, seq_len, seed) for d in range(dp)]
        # dp ranks may pack differently: run each part with its own position_ids, weight by its tokens
        total, count = 0.0, 0
        for p in parts:
            cu = hf.cu_seqlens_from_position_ids(p["position_ids"])
            labels = hf.shift_labels(p["labels"], cu)
            out = model(input_ids=p["input_ids"], position_ids=p["position_ids"], labels=labels,
                        shift_labels=labels, use_cache=False)  # no cache: HF detects packing only without one
            n = int((labels != -100).sum())
            total, count = total + out.loss * n, count + n
        loss = total / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4, help="local CPU ranks when not launched by torchrun")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel degree (dp = world / sp)")
    p.add_argument("--ulysses", type=int, default=1, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--strategy", default="ring", choices=seqpar.STRATEGIES)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "stripe"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="rows per dp rank")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--check", action="store_true", help="compare with one process on the global batch (CPU demo)")
    a = p.parse_args(argv)
    kw = dict(sp=a.sp, ulysses=a.ulysses, strategy=a.strategy, layout=a.layout, steps=a.steps, seq_len=a.seq_len,
              batch=a.batch, lr=a.lr)
    # Ranks import functions by reference: import this file as a module (its folder is sys.path[0]).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mod = importlib.import_module(Path(__file__).stem)
    # under torchrun this process is one rank; otherwise a pool of --nproc local CPU ranks
    losses = run_on_ranks(mod.train, a.nproc, **kw)[0]
    if "WORLD_SIZE" in os.environ:
        return 0
    if a.check:
        ref = reference(a.nproc // a.sp, a.steps, a.seq_len, a.batch, a.lr)
        err = max(abs(x - y) / abs(y) for x, y in zip(losses, ref))
        print(f"single process on the global batch: final loss {ref[-1]:.4f}; largest relative difference "
              f"over {a.steps} steps {err:.1e}")
        return 0 if err < 1e-3 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
