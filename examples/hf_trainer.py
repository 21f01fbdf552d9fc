"""Fine-tune a tiny Hugging Face Llama with the seqpar Trainer: ``transformers.Trainer`` plus ``sp=``.

    torchrun --nproc-per-node 4 examples/hf_trainer.py --sp 2       # dp = world / sp = 2, GPUs (nccl) or CPU
    accelerate launch --multi_gpu --num_processes 4 examples/hf_trainer.py --sp 2   # also on CPU (torchrun inside)
    python examples/hf_trainer.py --nproc 4 --sp 2 --check          # local CPU ranks, checked against the stock
                                                                    # Trainer on one process (same global batches)

The only change from a stock Trainer script is the import and ``sp=`` (see ``train``). The
documents are packed by ``DataCollatorWithFlattening`` (position ids restarting per document,
which seqpar turns into ``cu_seqlens``: no document attends to another on any rank); each
group of ``sp`` ranks reads one batch, and every rank holds ``1/sp`` of each document.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

import seqpar
from seqpar.launch.pool import run_on_ranks

VOCAB = 256
#: the rule the data follows: the token after t is NEXT[t] (a fixed random permutation), learnable quickly
NEXT = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234))


def tiny_llama(seed: int = 0):
    """A 2-layer Llama (GQA: 4 heads, 2 kv heads) with weights from ``seed``; sdpa until seqpar takes over."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def documents(n: int, seed: int = 0, min_len: int = 8, max_len: int = 96) -> list[dict[str, list[int]]]:
    """``n`` documents of random lengths, each from a random first token following ``NEXT``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok, ids = int(torch.randint(0, VOCAB, (1,), generator=g)), []
        for _ in range(int(torch.randint(min_len, max_len + 1, (1,), generator=g))):
            ids.append(tok)
            tok = int(NEXT[tok])
        out.append({"input_ids": ids})
    return out


def training_args(output_dir: str, batch: int, steps: int, lr: float, grad_accum: int = 1):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=lr, warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())  # transformers trains distributed on CPU only with use_cpu=True


def train(sp: int = 2, ulysses: int | None = None, strategy: str = "ring", steps: int = 10, batch: int = 4,
          docs: int = 256, lr: float = 3e-3, output_dir: str = "hf_trainer_out", grad_accum: int = 1) -> list[float]:
    """Train on this rank (under torchrun / accelerate launch, or a local pool); the logged loss of every step."""
    from transformers import DataCollatorWithFlattening

    from seqpar.integrations.hf import Trainer  # the one changed line: `from transformers import Trainer`

    trainer = Trainer(model=tiny_llama(), args=training_args(output_dir, batch, steps, lr, grad_accum),
                      train_dataset=documents(docs), data_collator=DataCollatorWithFlattening(),
                      sp=sp, ulysses=ulysses, strategy=strategy)  # ... and these three keywords
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        print(f"{trainer.mesh}, strategy {strategy}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps",
              flush=True)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "losses.json"), "w") as f:
            json.dump(losses, f)
    return losses


def reference(dp: int, steps: int = 10, batch: int = 4, docs: int = 256, lr: float = 3e-3,
              output_dir: str = "hf_trainer_ref", grad_accum: int = 1) -> list[float]:
    """The stock ``transformers.Trainer`` on one process over the same global batches (``dp * batch`` rows)."""
    from transformers import DataCollatorWithFlattening, Trainer

    trainer = Trainer(model=tiny_llama(), args=training_args(output_dir, batch * dp, steps, lr, grad_accum),
                      train_dataset=documents(docs), data_collator=DataCollatorWithFlattening())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4, help="local CPU ranks when not launched by torchrun/accelerate")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel degree (dp = world / sp)")
    p.add_argument("--ulysses", type=int, default=None, help="ulysses degree inside sp (strategy usp)")
    p.add_argument("--strategy", default="ring", choices=seqpar.STRATEGIES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="documents per data-parallel rank and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default="hf_trainer_out")
    p.add_argument("--check", action="store_true", help="compare with the stock Trainer on one process (CPU demo)")
    a = p.parse_args(argv)
    kw = dict(sp=a.sp, ulysses=a.ulysses, strategy=a.strategy, steps=a.steps, batch=a.batch, lr=a.lr,
              output_dir=a.output_dir)
    # Ranks import functions by reference: import this file as a module (its folder is sys.path[0]).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mod = importlib.import_module(Path(__file__).stem)
    losses = run_on_ranks(mod.train, a.nproc, **kw)[0]  # one rank under a launcher, else a pool of --nproc
    if "WORLD_SIZE" in os.environ or not a.check:
        return 0
    ref = reference(a.nproc // a.sp, a.steps, a.batch, lr=a.lr, output_dir=a.output_dir + "_ref")
    err = max(abs(x - y) / abs(y) for x, y in zip(losses, ref))
    print(f"stock Trainer on one process: final loss {ref[-1]:.4f}; largest relative difference over {a.steps} "
          f"steps {err:.1e}")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
