"""``seqpar train CONFIG``: the demo's training loop for real runs, launched by torchrun.

    torchrun --nproc-per-node 8 -m seqpar.cli train run.toml            # one node, NCCL on GPUs
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:PORT -m seqpar.cli train run.toml

The config (TOML or YAML) holds the keys of :class:`seqpar.train.TrainConfig`:
model (a registered name or a table of Hugging Face-style sizes), parallel degrees
(tp, ulysses, dp; sp takes the rest of the world), strategy and layout, data
(``{kind = "tokens", path = "...", dtype = "uint16"}``: a memory-mapped token
file, or the synthetic recall task), optimizer settings, checkpoint_dir /
save_every (resumes from the latest checkpoint, at any layout), log_every and
peak_tflops (for the MFU estimate).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import SeqParError
from ..launch.pool import leave_job

__all__ = ["add_parser"]


def _log(info: dict) -> None:
    mem = info["peak_mem_mb"]
    print(f"step {info['step']:>6}/{info['steps']}  loss {info['loss']:.4f}  {info['tokens_per_s']:.0f} tok/s  "
          f"peak mem/rank {max(mem):.0f} MB", flush=True)


def run(ns: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from ..train.trainer import TrainConfig, train

    try:
        cfg = TrainConfig.load(ns.config)
    except SeqParError as e:
        print(f"seqpar train: {e}", file=sys.stderr)
        return 2
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    result = train(cfg, log=_log)
    if not dist.is_initialized() or dist.get_rank() == 0:
        mfu = f", MFU {result.mfu:.1%}" if result.mfu is not None else ""
        print(f"done: final loss {result.losses[-1]:.4f}, token accuracy {result.accuracy:.3f}, "
              f"{result.tokens_per_s:.0f} tok/s over {result.world_size} ranks{mfu}", flush=True)
    leave_job()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the reference model from a TOML/YAML config (launch with torchrun)")
    p.add_argument("config", help="path to a .toml or .yaml config")
    p.set_defaults(func=run)
