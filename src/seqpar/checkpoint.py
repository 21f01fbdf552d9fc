"""Checkpoints that survive crashes and resume at another parallel layout.

A checkpoint holds the *single-device* view of the model and of AdamW's moments
(gathered over tp), so it loads at any tp / sp / dp degree: each rank keeps its
own shards on load.  Writing is atomic: files go to a temporary directory that is
renamed into place only when complete, and ``latest`` is updated after that; a
crash in the middle of a save leaves the previous checkpoint intact.  A
directory without its ``COMPLETE`` marker, or whose tensors do not load, is
refused with a clear message.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import SeqParError, check

__all__ = ["save", "load", "load_latest", "CheckpointError"]


class CheckpointError(SeqParError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


MOMENTS = ("exp_avg", "exp_avg_sq")


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _ensure_state(opt: torch.optim.Optimizer, step: int) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(float(step))
                for m in MOMENTS:
                    st[m] = torch.zeros_like(p, memory_format=torch.preserve_format)


def save(directory: str | Path, model, opt: torch.optim.Optimizer, step: int) -> Path:
    """Write ``step-N`` under ``directory`` (every rank calls; tp ranks help gather; rank 0 writes)."""
    directory = Path(directory)
    _ensure_state(opt, step)
    state = {"model": model.full_state_dict()}
    for m in MOMENTS:
        state[m] = model.full_state_dict(source=lambda p, m=m: opt.state[p][m])
    final = directory / f"step-{step}"
    if _is_writer():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-step-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "config": getattr(model.config, "name", None)}))
        (tmp / "COMPLETE").write_text("ok")
        with open(tmp / "COMPLETE", "rb") as f:
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: readers see the old state or the whole new one
        latest_tmp = directory / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, directory / "latest")
    _barrier()
    return final


def load(path: str | Path, model, opt: torch.optim.Optimizer | None = None) -> int:
    """Load a ``step-N`` directory into ``model`` (and ``opt``) at the current layout; returns N."""
    path = Path(path)
    check((path / "COMPLETE").is_file(), CheckpointError,
          f"checkpoint {str(path)!r} is incomplete (no COMPLETE marker: a save was interrupted); "
          f"load an earlier step-N directory")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        step = int(json.loads((path / "meta.json").read_text())["step"])
    except Exception as e:  # noqa: BLE001 - any unreadable file means a corrupted checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted and cannot be read: {e}") from e
    model.load_full_state_dict(state["model"])
    if opt is not None:
        _ensure_state(opt, step)
        for m in MOMENTS:
            model.load_full_state_dict(state[m], target=lambda p, m=m: opt.state[p][m])
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["step"].fill_(float(step))
    return step


def load_latest(directory: str | Path, model, opt: torch.optim.Optimizer | None = None) -> int:
    """Resume from ``directory/latest`` if there is one (returns its step), else start at 0."""
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return 0
    return load(Path(directory) / pointer.read_text().strip(), model, opt)
