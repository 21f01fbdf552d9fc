"""The strategy registry: each sequence-parallel attention strategy is one :class:`Strategy` registered by name.

:func:`seqpar.attention` validates its arguments into one
:class:`~seqpar.attention.spec.AttentionSpec` and hands it to the strategy's own
:meth:`~Strategy.plan` (cached per batch) and :meth:`~Strategy.run`.  A new strategy
is a subclass registered with :func:`register`: nothing else changes.  The names must
be those of :data:`seqpar.core.strategies.SP_STRATEGIES` (the planner and the command
line read that list); a test holds them equal.
"""
from __future__ import annotations

import torch

from .cores import Core
from .spec import AttentionSpec

__all__ = ["Strategy", "register", "get_strategy", "REGISTRY"]


class Strategy:
    """One way of computing attention over a sequence sharded across ``spec.group``.

    Subclasses set :attr:`name` and implement :meth:`prepare` (the plan, cached per batch, bound
    into the strategy's communicating :class:`~seqpar.attention.cores.Core`) and :meth:`run`;
    :meth:`validate` adds checks of their own (raised on every rank alike, before any communication).
    """

    #: the ``strategy=`` name users pass
    name: str = ""

    def validate(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise a SeqParError for a call this strategy cannot run (beyond the common checks)."""

    def prepare(self, spec: AttentionSpec) -> Core:
        """The core of this call, bound to its plan (built once per distinct layout/mask/packing, then cached).
        Host only: no communication, no tensor data."""
        raise NotImplementedError

    def run(self, spec: AttentionSpec, core: Core, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out ``[B, S/N, H, D]``, lse ``[B, H, S/N]`` float32, or None when ``spec.return_lse`` is False
        and computing it would cost communication)."""
        raise NotImplementedError


REGISTRY: dict[str, Strategy] = {}


def register(strategy):
    """Add ``strategy`` (a :class:`Strategy` instance, or a subclass, instantiated here) under its name,
    replacing one of the same name; returns its argument, so it works as a class decorator."""
    instance = strategy() if isinstance(strategy, type) else strategy
    if not isinstance(instance, Strategy) or not instance.name:
        raise TypeError(f"register() takes a named Strategy (subclass or instance), got {strategy!r}")
    REGISTRY[instance.name] = instance
    return strategy


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name`` (KeyError if none)."""
    return REGISTRY[name]
