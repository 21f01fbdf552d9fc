"""Process groups for dp x sp x tp, with sp itself ulysses x ring.

Rank order (fastest-varying last): ``dp, ring, ulysses, tp``.  Tensor-parallel
ranks are neighbours (inside a node, where TP's per-layer collectives need
NVLink), ulysses groups come next (all-to-all also wants the fast links), and
ring neighbours may cross nodes because ring transfers overlap with compute.

An explicit :class:`Mesh` is passed around; :func:`init` also records it as the
process-wide default that ``mesh=None`` / ``group=None`` arguments refer to.

``group=None`` has one meaning everywhere a public function takes it: the default mesh's
group of the kind that function works on (its sequence-parallel group for attention,
collectives and sharding, its tensor-parallel group for :mod:`seqpar.tp`).  It is
resolved once, at the public boundary (:func:`resolve_group`); inside the library a
group is always explicit, and a single process is the explicit :data:`SINGLE`, never
``None``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, check

__all__ = ["Mesh", "init", "get_mesh", "set_mesh", "resolve_group", "resolve_mesh", "group_size", "group_rank",
           "default_backend", "on_cuda_backend", "SINGLE", "SingleProcess"]

DIMS = ("dp", "ring", "ulysses", "tp")


class SingleProcess:
    """The group of one process: every collective over it is the identity.

    Use the one instance, :data:`SINGLE`.  It is what a mesh's group of degree 1 is when no
    process group exists, and what to pass to keep a call local inside a distributed job
    (``group=SINGLE``), where ``group=None`` would mean the default mesh's group.
    """

    _instance: SingleProcess | None = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "seqpar.mesh.SINGLE"

    def __reduce__(self):
        return (SingleProcess, ())


#: the explicit single-process group (see :class:`SingleProcess`)
SINGLE = SingleProcess()


@dataclass
class Mesh:
    """The parallel layout of this process: degrees, ranks and process groups.

    A group attribute is :data:`SINGLE` when its degree is 1 and no process group
    exists (a single process): collectives over it are identities.
    """

    dp: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    device_mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh, None without a process group
    groups: dict = field(default_factory=dict)

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.tp

    def group(self, name: str):
        """Process group ``name`` in {dp, sp, ring, ulysses, tp, dp_sp}, or :data:`SINGLE` for a trivial one."""
        if name not in _GROUP_NAMES:
            raise ConfigError(f"unknown mesh group {name!r}: use dp, sp, ring, ulysses, tp or dp_sp")
        return self.groups.get(name, SINGLE)

    @property
    def sp_group(self):
        return self.group("sp")

    @property
    def ulysses_group(self):
        return self.group("ulysses")

    @property
    def ring_group(self):
        return self.group("ring")

    @property
    def tp_group(self):
        return self.group("tp")

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def dp_sp_group(self):
        """Group over which gradients of parameters replicated across dp and sp are averaged."""
        return self.group("dp_sp")

    @property
    def dp_sp_mesh(self):
        """1-D DeviceMesh over dp x sp: hand it to FSDP2's ``fully_shard`` (ZeRO-3 over dp and sp, as
        DeepSpeed-Ulysses does), None without a process group."""
        return None if self.device_mesh is None else self.device_mesh["dp_sp"]

    def rank(self, name: str) -> int:
        """This process's rank inside group ``name``."""
        return group_rank(self.group(name))

    def __repr__(self) -> str:
        return f"Mesh(dp={self.dp}, sp={self.sp} (ulysses={self.ulysses} x ring={self.ring}), tp={self.tp})"


_GROUP_NAMES = frozenset(("dp", "sp", "ring", "ulysses", "tp", "dp_sp"))
_DEFAULT: Mesh | None = None


def get_mesh() -> Mesh | None:
    """The mesh set by the last :func:`init` (or :func:`set_mesh`), if any."""
    return _DEFAULT


def set_mesh(mesh: Mesh | None) -> None:
    """Make ``mesh`` the default that ``mesh=None`` arguments refer to."""
    global _DEFAULT
    _DEFAULT = mesh


def _resolve_degrees(world: int, sp, ulysses, ring, tp, dp) -> tuple[int, int, int, int]:
    for name, val in (("sp", sp), ("ulysses", ulysses), ("ring", ring), ("tp", tp), ("dp", dp)):
        check(val is None or (isinstance(val, int) and val >= 1), ConfigError,
              f"{name}={val!r} must be a positive integer")
    tp = tp or 1
    if sp is None and ulysses is not None and ring is not None:
        sp = ulysses * ring
    if sp is None:
        if dp is None:
            check(world % tp == 0, ConfigError, f"tp={tp} does not divide world size {world}")
            sp, dp = world // tp, 1
        else:
            check(world % (tp * dp) == 0, ConfigError,
                  f"dp={dp} x tp={tp} = {dp * tp} does not divide world size {world}")
            sp = world // (tp * dp)
    if dp is None:
        check(world % (tp * sp) == 0, ConfigError,
              f"sp={sp} x tp={tp} = {sp * tp} does not divide world size {world}")
        dp = world // (tp * sp)
    check(dp * sp * tp == world, ConfigError,
          f"dp={dp} x sp={sp} x tp={tp} = {dp * sp * tp} does not match world size {world}: "
          f"choose degrees whose product is {world}")
    if ulysses is None:
        ulysses = sp // ring if ring is not None else 1
    if ring is None:
        check(sp % ulysses == 0, ConfigError, f"ulysses={ulysses} does not divide sp={sp}")
        ring = sp // ulysses
    check(ulysses * ring == sp, ConfigError,
          f"ulysses={ulysses} x ring={ring} = {ulysses * ring} does not match sp={sp}")
    return dp, ring, ulysses, tp


def init(sp: int | None = None, ulysses: int | None = None, ring: int | None = None, tp: int | None = None,
         dp: int | None = None, backend: str | None = None, *, device_type: str | None = None,
         timeout: float | None = None) -> Mesh:
    """Build the dp x sp(ulysses x ring) x tp mesh and make it the default.

    Uses the already initialised default process group, or initialises one from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), with
    ``backend`` defaulting to :func:`default_backend` (NCCL for CUDA tensors beside gloo
    for CPU ones where CUDA is available, else gloo).
    With neither (a plain single process) the world size is 1 and no process
    group is created.  Unspecified degrees are derived: ``sp`` takes what the
    world leaves after tp and dp, ``ulysses`` defaults to 1 (pure ring).
    Communication: creates the process groups (collective over the world).
    """
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        backend = backend or default_backend()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout) if timeout else None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp, ring, ulysses, tp = _resolve_degrees(world, sp, ulysses, ring, tp, dp)
    mesh = Mesh(dp=dp, ring=ring, ulysses=ulysses, tp=tp)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if on_cuda_backend() else "cpu"
        dm = init_device_mesh(device_type, (dp, ring, ulysses, tp), mesh_dim_names=DIMS)
        mesh.device_mesh = dm
        mesh.groups = {name: dm.get_group(name) for name in DIMS}
        mesh.groups["sp"] = dm["ring", "ulysses"]._flatten("sp").get_group()
        mesh.groups["dp_sp"] = dm["dp", "ring", "ulysses"]._flatten("dp_sp").get_group()
    set_mesh(mesh)
    return mesh


def default_backend() -> str:
    """``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are available, else ``"gloo"``.

    NCCL carries the CUDA tensors; gloo beside it carries the small CPU-tensor collectives
    (loss and token counts, gradient norms, memory figures, object broadcasts of checkpoints
    and debug checks), which a NCCL-only process group refuses.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def on_cuda_backend(group=None) -> bool:
    """The (default) process group runs NCCL for CUDA tensors (alone or beside gloo)."""
    return dist.is_initialized() and "nccl" in dist.get_backend_config(group)


def resolve_group(group=None, mesh: Mesh | None = None, name: str = "sp"):
    """The process group a public call means: called once, at the public boundary.

    An explicit ``group`` (a process group or :data:`SINGLE`) wins; else group ``name``
    of ``mesh`` or of the default mesh; else the world group if a process group exists
    (what :func:`init` with default degrees would make the sp group); else :data:`SINGLE`.
    Never returns None.
    """
    if group is not None:
        return group
    mesh = mesh if mesh is not None else _DEFAULT
    if mesh is not None:
        return mesh.group(name)
    return dist.group.WORLD if dist.is_initialized() else SINGLE


def resolve_mesh(mesh: Mesh | None = None) -> Mesh:
    """The mesh an API call means: ``mesh``, else the default mesh (:func:`init`), else one process.

    Without any mesh while a process group exists, the call would silently run on one rank's
    data as if alone: that raises (call :func:`seqpar.init` first, or pass ``mesh=``).
    """
    if mesh is not None:
        return mesh
    if _DEFAULT is not None:
        return _DEFAULT
    check(not (dist.is_available() and dist.is_initialized()), ConfigError,
          "torch.distributed is initialised but no seqpar mesh is set: call seqpar.init(sp=..., dp=...) first "
          "or pass mesh=")
    return Mesh()


def group_size(group) -> int:
    """Size of a group (1 for :data:`SINGLE`; None is resolved as at every public call)."""
    if group is None:
        group = resolve_group(None)
    return 1 if group is SINGLE else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in a group (0 for :data:`SINGLE`; None is resolved as at every public call)."""
    if group is None:
        group = resolve_group(None)
    return 0 if group is SINGLE else dist.get_rank(group)

