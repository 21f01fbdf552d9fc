"""Random-number streams for tensor and sequence parallelism (Megatron's ``CudaRNGStatesTracker``).

Dropout must behave as on one device, where every element gets its own
independent draw.  Under parallelism that means:

* activations *replicated* over the tp group (sequence_parallel off, outside the
  column/row pair) must see the *same* mask on every tp rank, or the replicas
  diverge;
* *different* data (another tp shard of the hidden dim inside the pair, another
  sequence shard) must see *different* masks, or the masks are correlated
  copies of each other.

:func:`model_parallel_seed` therefore sets two streams:

* the default generator (plain ``F.dropout``): seeded per sequence shard,
  ``seed + shard`` with ``shard = sp_rank`` (sequence_parallel off: the same
  on every tp rank) or ``sp_rank * tp + tp_rank`` (sequence_parallel on: the
  residual stream is sharded over tp too);
* the tracker's ``"tensor-parallel"`` stream, for dropout inside the column/row
  pair (e.g. on attention heads split over tp), used as
  ``with get_rng_tracker().fork(): F.dropout(...)``: seeded
  ``seed + 2718 + tp_rank + tp * sp_rank``, Megatron's ``seed + 2718 + tp_rank``
  when there is no sequence parallelism, offset per sp rank because those ranks
  hold other tokens.

Exactness contract: dropout is random, so a parallel run cannot reproduce the
single-device masks; what is guaranteed (and tested) is the stream structure
above: same seed and rank -> same masks; different tp ranks -> different
tensor-parallel masks; default masks identical over tp ranks exactly when
sequence_parallel is off.  Exact comparisons with one device run without
dropout (or with p=0).

Call :func:`model_parallel_seed` *after* building (initialising) the model:
seqpar's layers initialise from the default generator and are identical over
ranks only if it is, which per-shard seeding ends.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..core.errors import ConfigError, check
from ..core.mesh import Mesh, resolve_mesh

__all__ = ["RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "TENSOR_PARALLEL_RNG"]

TENSOR_PARALLEL_RNG = "tensor-parallel"
_TP_OFFSET = 2718  # Megatron's offset, so the tp stream never equals the default stream of a small world


def _cuda() -> bool:
    return torch.cuda.is_available()


class RNGStatesTracker:
    """Named generator states (CPU, and the current CUDA device when CUDA is available).

    ``fork(name)`` swaps a named state into the default generators for the block and
    back out afterwards, so code outside the block draws exactly what it would have
    drawn without it, and successive forks continue the named stream.
    """

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self) -> None:
        self._states = {}

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def get_states(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """A copy of the states (checkpointing; activation recomputation must replay the same masks)."""
        return {k: (c.clone(), None if g is None else g.clone()) for k, (c, g) in self._states.items()}

    def set_states(self, states: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self._states = {k: (c.clone(), None if g is None else g.clone()) for k, (c, g) in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default generators are left untouched)."""
        check(name not in self._states, ConfigError, f"RNG stream {name!r} already exists; reset() the tracker first")
        check(isinstance(seed, int), ConfigError, f"seed must be an int, got {seed!r}")
        saved = _get()
        try:
            torch.random.default_generator.manual_seed(seed)
            if saved[1] is not None:
                torch.cuda.manual_seed(seed)  # the current device only, like the state we keep
            self._states[name] = _get()
        finally:
            _set(saved)

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default generators are restored after it."""
        check(name in self._states, ConfigError,
              f"unknown RNG stream {name!r} (have {self.names}); call seqpar.tp.model_parallel_seed(seed, mesh) "
              f"or get_rng_tracker().add(name, seed) first")
        saved = _get()
        _set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get()
            _set(saved)


def _get() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if _cuda() else None)


def _set(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None and _cuda():
        torch.cuda.set_rng_state(state[1])


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (the one :func:`model_parallel_seed` fills)."""
    return _TRACKER


def model_parallel_seed(seed: int, mesh: Mesh | None = None, *, sequence_parallel: bool = False) -> dict[str, int]:
    """Seed the default generator per sequence shard and the ``"tensor-parallel"`` stream per tp shard.

    See the module docstring for the seeds and the contract.  ``sequence_parallel`` must match the
    model's layers.  Resets the tracker.  Returns the two seeds used, for logging.
    No communication.
    """
    check(isinstance(seed, int) and seed >= 0, ConfigError, f"seed must be a non-negative int, got {seed!r}")
    mesh = resolve_mesh(mesh)
    tp, tp_rank, sp_rank = mesh.tp, mesh.rank("tp"), mesh.rank("sp")
    shard = sp_rank * tp + tp_rank if sequence_parallel else sp_rank
    seeds = {"default": seed + shard, TENSOR_PARALLEL_RNG: seed + _TP_OFFSET + tp_rank + tp * sp_rank}
    torch.manual_seed(seeds["default"])
    _TRACKER.reset()
    _TRACKER.add(TENSOR_PARALLEL_RNG, seeds[TENSOR_PARALLEL_RNG])
    return seeds
