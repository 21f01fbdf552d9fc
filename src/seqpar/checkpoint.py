"""Checkpoints on ``torch.distributed.checkpoint`` that survive crashes and resume at another layout.

Every rank writes only its own shards: each single-device tensor of the model
and of AdamW's moments is saved as a DTensor over the tensor-parallel mesh
(``Shard(dim)`` for split weights, ``Replicate()`` for norms), under its
single-device name (``layers.3.q_proj.weight``...), so DCP can reshard it on load
to any tp, sp or dp degree (replicas across dp and sp are written once).

Writing is atomic: DCP writes into a temporary directory, which rank 0 renames
into place only after every rank finished and a ``COMPLETE`` marker is written;
``latest`` is updated after that.  A crash in the middle of a save leaves the
previous checkpoint intact; a directory without its marker, or whose files do
not load, is refused with a clear message.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .errors import SeqParError, check

__all__ = ["save", "load", "load_latest", "CheckpointError"]


class CheckpointError(SeqParError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(s: str) -> str:
    if not dist.is_initialized():
        return s
    box = [s]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _ensure_state(opt: torch.optim.Optimizer, step: int) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(float(step))
                for m in MOMENTS:
                    st[m] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sources(opt):
    yield "model", None
    if opt is not None:
        for m in MOMENTS:
            yield m, (lambda p, m=m: opt.state[p][m])


def _state(model, opt, fresh: bool) -> tuple[dict, list]:
    """DCP state dict of local shards (``fresh``: empty buffers to load into) and the entries they map to."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = model.mesh
    tp_mesh = mesh.device_mesh["tp"] if mesh.device_mesh is not None else None
    state, targets = {}, []
    for kind, source in _sources(opt):
        for e in model.entries(source):
            local = e.get()
            local = torch.empty_like(local) if fresh else local.contiguous()
            if tp_mesh is not None:
                placement = Replicate() if e.dim is None else Shard(e.dim)
                full = list(local.shape)
                if e.dim is not None:
                    full[e.dim] *= mesh.tp
                local = DTensor.from_local(local, tp_mesh, [placement], run_check=False, shape=torch.Size(full),
                                           stride=torch.empty(full, device="meta").stride())
            state[f"{kind}/{e.name}"] = local
            targets.append((f"{kind}/{e.name}", e))
    return state, targets


def save(directory: str | Path, model, opt: torch.optim.Optimizer | None, step: int) -> Path:
    """Write ``directory/step-N`` (every rank calls; each writes its own shards). Returns its path."""
    directory = Path(directory)
    if opt is not None:
        _ensure_state(opt, step)
    final = directory / f"step-{step}"
    tmp = Path(_broadcast_str(str(directory / f".tmp-step-{step}-{os.getpid()}")))
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state, _ = _state(model, opt, fresh=False)
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "model": getattr(model.config, "name", None),
                                                   "layout": repr(model.mesh)}))
        with open(tmp / "COMPLETE", "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: readers see the old state or the whole new one
        pointer = directory / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
    _barrier()
    return final


def load(path: str | Path, model, opt: torch.optim.Optimizer | None = None) -> int:
    """Load ``step-N`` into ``model`` (and ``opt``) at the current layout, resharding as needed; returns N."""
    path = Path(path)
    check((path / "COMPLETE").is_file(), CheckpointError,
          f"checkpoint {str(path)!r} is incomplete (no COMPLETE marker: the save was interrupted); "
          f"load an earlier step-N directory")
    try:
        step = int(json.loads((path / "meta.json").read_text())["step"])
        if opt is not None:
            _ensure_state(opt, step)
        state, targets = _state(model, opt, fresh=True)
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable files: a corrupted checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or does not match this model: {e}") from e
    for key, entry in targets:
        value = state[key]
        entry.set(value.to_local() if hasattr(value, "to_local") else value)
    if opt is not None:
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
