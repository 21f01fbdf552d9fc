"""Shared plumbing of the tensor-parallel modules: mesh resolution, init control, parameter gathering."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

from ..core import comm
from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import Mesh, group_rank, group_size, resolve_mesh

_SKIP_INIT = [False]
_M = TypeVar("_M", bound=nn.Module)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Modules built inside allocate their parameters without initialising them (used by ``from_full``).

    Random initialisation would consume the default generator, so building a layer
    only to overwrite its weights must not run it.
    """
    prev, _SKIP_INIT[0] = _SKIP_INIT[0], True
    try:
        yield
    finally:
        _SKIP_INIT[0] = prev


def should_init(*params: torch.Tensor) -> bool:
    return not _SKIP_INIT[0] and all(p.device.type != "meta" for p in params)


PARAM_MARKS = ("tensor_parallel", "partition_dim", "sequence_parallel")


def mark_param(p: nn.Parameter, **marks: bool | int) -> None:
    """Set seqpar's marks (``tensor_parallel``, ``partition_dim``, ``sequence_parallel``) on ``p``.

    They are plain attributes, unknown to ``nn.Parameter``'s type, hence ``setattr``; only the names in
    ``PARAM_MARKS`` are accepted, as those are the ones a deepcopy of a TPModule carries over.
    """
    for name, value in marks.items():
        check(name in PARAM_MARKS, ConfigError, f"unknown parameter mark {name!r}: use one of {PARAM_MARKS}")
        setattr(p, name, value)


def deepcopy_keeping_marks(module: _M, memo: dict, shared: tuple = ()) -> _M:
    """``copy.deepcopy`` of ``module`` that shares ``shared`` (process groups cannot be copied) and keeps
    the parameter marks above (``Parameter.__deepcopy__`` drops attributes: the sync would then miss them)."""
    for obj in shared:
        if obj is not None:
            memo[id(obj)] = obj
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    for p in module.parameters():
        q = memo.get(id(p))
        for attr in PARAM_MARKS:
            if q is not None and hasattr(p, attr):
                setattr(q, attr, getattr(p, attr))
    return new


def divisible(size: int, n: int, what: str, fix: str) -> int:
    """``size // n``, or a ShapeError naming ``fix`` (raised at construction, before any collective)."""
    check(isinstance(size, int) and size > 0, ShapeError, f"{what}={size!r} must be a positive integer")
    check(size % n == 0, ShapeError, f"{what}={size} is not divisible by the tensor-parallel size {n}; {fix}")
    return size // n


class TPModule(nn.Module):
    """Base of the tensor-parallel modules: holds the tp group, its size and this rank's index.

    Only the group is kept (not the mesh); group ``None`` is the trivial group.
    """

    def __init__(self, mesh: Mesh | None) -> None:
        super().__init__()
        mesh = resolve_mesh(mesh)
        self.tp_group = mesh.tp_group
        self.tp_size = group_size(self.tp_group)
        self.tp_rank = group_rank(self.tp_group)

    def __deepcopy__(self, memo: dict) -> TPModule:
        return deepcopy_keeping_marks(self, memo, (self.tp_group,))

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every tp rank's ``t`` along ``dim`` (a collective: all tp ranks must call)."""
        if self.tp_size == 1:
            return t.detach().clone()
        with torch.no_grad():
            return comm.all_gather(t.detach(), dim, self.tp_group)

    def _gather_param(self, p: torch.Tensor | None, dim: int | None, grad: bool) -> tuple:
        """(gathered value, gathered grad or None) of a parameter sharded along ``dim`` (None: replicated)."""
        if p is None:
            return None, None
        value = p.detach().clone() if dim is None else self._gather(p, dim)
        if not grad:
            return value, None
        grad_ = p.grad
        if grad_ is None:
            raise ShapeError("to_full(grad=True) needs .grad on every parameter: run backward first")
        g = grad_.detach().clone() if dim is None else self._gather(grad_, dim)
        return value, g


def load_full(dst: nn.Parameter, src: torch.Tensor, n: int, rank: int, dim: int | None) -> None:
    """Copy this rank's chunk (along ``dim``; all of it for None) of ``src`` into ``dst``."""
    with torch.no_grad():
        dst.copy_(src if dim is None else src.chunk(n, dim)[rank])


def set_full(p: nn.Parameter, value: torch.Tensor, grad: torch.Tensor | None) -> None:
    with torch.no_grad():
        p.copy_(value)
    p.grad = grad
