"""``seqpar train CONFIG``: the demo's training loop for real runs, launched by torchrun.

    torchrun --nproc-per-node 8 -m seqpar.cli train run.toml            # one node, NCCL on GPUs
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m seqpar.cli train run.toml

The config (TOML or YAML) holds the keys of :class:`seqpar.train.TrainConfig`:
model (a registered name or a table of Hugging Face-style sizes), parallel degrees
(tp, ulysses, dp; sp takes the rest of the world), strategy and layout, data
(``{kind = "tokens", path = "...", dtype = "uint16"}``: a memory-mapped token
file, or the synthetic recall / lookup tasks), optimizer settings, checkpoint_dir /
save_every (resumes from the latest checkpoint, at any layout; the last step is always
saved), log_dir (metrics.jsonl and TensorBoard events; default checkpoint_dir),
log_every and peak_tflops (for the MFU estimate).  A key no table knows is refused.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import SeqParError
from ..launch.pool import leave_job
from .progress import Progress, fail

__all__ = ["add_parser"]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(ns: argparse.Namespace) -> int:
    import torch

    from ..train.trainer import TrainConfig, train

    try:
        cfg = TrainConfig.load(ns.config)
    except SeqParError as e:
        return fail("train", e, quiet=_rank() != 0)  # every rank read the same file: rank 0 says it once
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank0 = _rank() == 0
    bar = Progress(cfg.steps, "train", unit="step") if rank0 else None
    try:
        result = train(cfg, log=bar.line if bar else None, on_step=bar.step if bar else None)
    except SeqParError as e:
        if bar:
            bar.close()
        code = fail("train", e, quiet=not rank0 and _same_everywhere(e), rank=_rank() if "RANK" in os.environ else None)
        _leave_after_error()
        return code
    if bar:
        bar.close()
    if rank0:
        if result.finished_before:
            print(f"nothing to train: the latest checkpoint in {cfg.checkpoint_dir} is at step {result.start_step}, "
                  f"and steps = {cfg.steps} (raise steps to train further); token accuracy {result.accuracy:.3f}",
                  flush=True)
        else:
            mfu = f", MFU {result.mfu:.1%}" if result.mfu is not None else ""
            resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
            print(f"done{resumed}: final loss {result.losses[-1]:.4f}, token accuracy {result.accuracy:.3f}, "
                  f"{result.tokens_per_s:.0f} tok/s over {result.world_size} ranks{mfu}", flush=True)
            if cfg.checkpoint_dir:
                print(f"checkpoint: {cfg.checkpoint_dir}/step-{cfg.steps}", flush=True)
            if cfg.log_dir or cfg.checkpoint_dir:
                print(f"metrics: {cfg.log_dir or cfg.checkpoint_dir}/metrics.jsonl", flush=True)
    leave_job()
    return 0


def _same_everywhere(e: SeqParError) -> bool:
    """Configuration and shape errors are raised on every rank alike: one rank reports them."""
    from ..core.errors import ConfigError, ShapeError

    return isinstance(e, (ConfigError, ShapeError))


def _leave_after_error() -> None:
    """Drop the process group without a barrier: a peer may have failed differently and never arrive."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    sys.stdout.flush()


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the reference model from a TOML/YAML config (launch with torchrun)",
                       description=__doc__.split("\n\n")[0],
                       epilog="examples:\n  seqpar train examples/train_tiny.toml\n"
                              "  torchrun --nproc-per-node 2 -m seqpar.cli train examples/train_tiny.toml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="path to a .toml or .yaml config")
    p.set_defaults(func=run)
