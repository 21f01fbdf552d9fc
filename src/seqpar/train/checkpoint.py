"""Checkpoints on ``torch.distributed.checkpoint`` that survive crashes and resume at another layout.

Every rank writes only its own shards: each single-device tensor of the model
and of the optimizer's per-parameter state (AdamW's moments, amsgrad's maximum,
SGD's momentum, Adagrad's sums: any state tensor shaped like its parameter; the
optimizer's type and state names are recorded and checked on load) is saved as a
DTensor over the tensor-parallel mesh
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
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..core.errors import SeqParError, check

__all__ = ["save", "load", "load_latest", "CheckpointError"]


class CheckpointError(SeqParError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


#: AdamW's moments: what checkpoints written before the optimizer's state was recorded hold
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


def _moments(opt: torch.optim.Optimizer) -> tuple[list[str], bool]:
    """The optimizer's per-parameter state: names of the tensors shaped like their parameter (resharded
    like it) and whether it keeps a ``step`` count.  Anything else cannot be resharded: refused."""
    names, has_step = set(), False
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":
                    has_step = True
                elif torch.is_tensor(value) and value.shape == p.shape:
                    names.add(key)
                else:
                    raise CheckpointError(
                        f"{type(opt).__name__}'s state {key!r} is neither a tensor shaped like its parameter nor "
                        f"'step': seqpar checkpoints cannot reshard it (AdamW, Adam with or without amsgrad, "
                        f"SGD with momentum and the like are supported)")
    return sorted(names), has_step


def _agree(names: list[str], has_step: bool) -> tuple[list[str], bool]:
    """The union over ranks: a rank whose optimizer holds no state yet must save the same entries."""
    if not dist.is_initialized():
        return names, has_step
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (names, has_step))
    return sorted({n for ns, _ in every for n in ns}), any(s for _, s in every)


def _ensure_state(opt: torch.optim.Optimizer, step: int, names: list[str], has_step: bool) -> None:
    """Give every parameter the state ``names`` (zeros where it has none yet), so every rank saves or
    loads the same entries."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if has_step and "step" not in st:
                st["step"] = torch.tensor(float(step))
            for m in names:
                if m not in st:
                    st[m] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sources(opt, names):
    yield "model", None
    if opt is not None:
        for m in names:
            yield m, (lambda p, m=m: opt.state[p][m])


def _state(model, opt, fresh: bool, names=()) -> tuple[dict, list]:
    """DCP state dict of local shards (``fresh``: empty buffers to load into) and the entries they map to."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = model.mesh
    tp_mesh = mesh.device_mesh["tp"] if mesh.device_mesh is not None else None
    state, targets = {}, []
    for kind, source in _sources(opt, names):
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
    names, has_step = _agree(*_moments(opt)) if opt is not None else ([], False)
    if opt is not None:
        _ensure_state(opt, step, names, has_step)
    final = directory / f"step-{step}"
    tmp = Path(_broadcast_str(str(directory / f".tmp-step-{step}-{os.getpid()}")))
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state, _ = _state(model, opt, fresh=False, names=names)
    with warnings.catch_warnings():  # one process without a group is what no_dist means: no warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if _rank() == 0:
        optimizer = None if opt is None else {"type": type(opt).__name__, "moments": names, "step": has_step,
                                              "amsgrad": bool(opt.defaults.get("amsgrad", False))}
        (tmp / "meta.json").write_text(json.dumps({"step": step, "model": getattr(model.config, "name", None),
                                                   "layout": repr(model.mesh), "optimizer": optimizer}))
        with open(tmp / "COMPLETE", "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        # re-saving a step: the old copy steps aside (atomic) rather than being deleted first, so a crash
        # between the two renames leaves it whole under .old-step-N, where load() finds it
        aside = directory / f".old-{final.name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)  # atomic on POSIX: readers see the old state or the whole new one
        shutil.rmtree(aside, ignore_errors=True)
        pointer = directory / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")
    _barrier()
    return final


def load(path: str | Path, model, opt: torch.optim.Optimizer | None = None) -> int:
    """Load ``step-N`` into ``model`` (and ``opt``) at the current layout, resharding as needed; returns N."""
    path = Path(path)
    aside = path.with_name(f".old-{path.name}")
    if not path.exists() and (aside / "COMPLETE").is_file():  # a re-save of this step crashed between renames
        path = aside
    check((path / "COMPLETE").is_file(), CheckpointError,
          f"checkpoint {str(path)!r} is incomplete (no COMPLETE marker: the save was interrupted); "
          f"load an earlier step-N directory")
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = int(meta["step"])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable files: a corrupted checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted (meta.json: {e})") from e
    # checkpoints written before the optimizer was recorded hold AdamW's moments
    saved: dict[str, Any] | None = (
        meta["optimizer"] if "optimizer" in meta else {"type": "AdamW", "moments": list(MOMENTS), "step": True})
    names, has_step = (saved["moments"], saved["step"]) if opt is not None and saved else ([], False)
    if opt is not None:
        if saved is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state (saved with opt=None): load "
                                  f"the model alone (opt=None) and start the optimizer afresh")
        check(type(opt).__name__ == saved["type"], CheckpointError,
              f"checkpoint {str(path)!r} holds {saved['type']} state, but the optimizer is {type(opt).__name__}: "
              f"resume with a {saved['type']}, or load the model alone (opt=None)")
        amsgrad = bool(opt.defaults.get("amsgrad", False))
        check(amsgrad == saved.get("amsgrad", False), CheckpointError,
              f"checkpoint {str(path)!r} was saved with amsgrad={not amsgrad}, but the optimizer has "
              f"amsgrad={amsgrad}: resume with the same setting")
    try:
        if opt is not None:
            _ensure_state(opt, step, names, has_step)
        state, targets = _state(model, opt, fresh=True, names=names)
        with warnings.catch_warnings():  # one process without a group is what no_dist means: no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable files: a corrupted checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or does not match this model: {e}") from e
    for key, entry in targets:
        value = state[key]
        entry.set(value.to_local() if hasattr(value, "to_local") else value)
    if opt is not None and has_step:
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
