"""Opt-in checks that turn silent distributed failures into clear errors.

* Debug mode (``SEQPAR_DEBUG=1`` or :func:`set_debug`): before an operation
  communicates, the ranks of its group exchange a small description (operation,
  shapes, dtypes, options) with one all-gather and compare them.  A rank whose
  shapes differ would otherwise deadlock every other rank in a collective that
  never matches; here every rank raises the same error naming the rank that differs.
* Finite checks (``SEQPAR_CHECK_FINITE=1`` or :func:`set_check_finite`): attention
  outputs and their gradients are checked for NaN/Inf and the error names the
  layer, the rank and the strategy.

Both cost a little on every call, so they are off by default.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import SeqParError, ShapeError
from .mesh import group_size
from .stats import record_comm

__all__ = ["set_debug", "debug_enabled", "set_check_finite", "check_finite_enabled", "check_agree",
           "check_finite", "NumericsError"]

_STATE = {"debug": os.environ.get("SEQPAR_DEBUG", "0") not in ("", "0"),
          "finite": os.environ.get("SEQPAR_CHECK_FINITE", "0") not in ("", "0")}


class NumericsError(SeqParError, FloatingPointError):
    """NaN or Inf where a finite value was expected."""


def set_debug(flag: bool = True) -> None:
    """Turn cross-rank agreement checks on or off (also ``SEQPAR_DEBUG=1``)."""
    _STATE["debug"] = bool(flag)


def debug_enabled() -> bool:
    return _STATE["debug"]


def set_check_finite(flag: bool = True) -> None:
    """Turn NaN/Inf checks of attention outputs and gradients on or off (also ``SEQPAR_CHECK_FINITE=1``)."""
    _STATE["finite"] = bool(flag)


def check_finite_enabled() -> bool:
    return _STATE["finite"]


def describe(x: torch.Tensor) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device.type}"


def check_agree(op: str, group, *, why: str = "it would hang", **meta) -> None:
    """In debug mode, raise on every rank unless all ranks of ``group`` pass the same ``op`` and ``meta``.

    ``why`` says in the message what disagreeing ranks would cause.

    Communication (debug mode only): one all-gather of a short string per rank.
    """
    if not _STATE["debug"] or group_size(group) == 1:
        return
    mine = (op, tuple(sorted((k, describe(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in meta.items())))
    everyone: list = [None] * group_size(group)
    record_comm("debug_all_gather", len(repr(mine)))
    dist.all_gather_object(everyone, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    # the majority description is "expected"; every other rank is named
    counts: dict = {}
    for d in everyone:
        counts[d] = counts.get(d, 0) + 1
    expected = max(counts, key=lambda d: (counts[d], -everyone.index(d)))
    odd = [(ranks[i], d) for i, d in enumerate(everyone) if d != expected]
    if odd:
        lines = [f"rank {r} runs {d[0]} with {dict(d[1])}" for r, d in odd]
        raise ShapeError(f"ranks disagree before {op} ({why}): most ranks run {expected[0]} with "
                         f"{dict(expected[1])}, but " + "; ".join(lines))


def check_finite(tensors: dict[str, torch.Tensor], what: str, group=None) -> None:
    """Raise NumericsError on *every* rank of ``group`` if any rank's tensors hold NaN or Inf.

    The error names the tensor, ``what`` (e.g. the layer) and the offending ranks.  Raising on
    one rank only would leave the others waiting in the next collective, so the verdict is
    shared: one all-gather of a few flags per call (check mode only).
    """
    flags = torch.tensor([[int(bool(torch.isnan(t).any())), int(bool(torch.isinf(t).any()))]
                          for t in tensors.values()], dtype=torch.int32)
    n = group_size(group)
    if n > 1:
        everyone = [torch.empty_like(flags) for _ in range(n)]
        record_comm("finite_all_gather", flags.numel() * 4 * (n - 1))
        dist.all_gather(everyone, flags, group=group)
        ranks = dist.get_process_group_ranks(group)
    else:
        everyone, ranks = [flags], [dist.get_rank() if dist.is_initialized() else 0]
    bad = []
    for rank, f in zip(ranks, everyone):
        for (name, _), (has_nan, has_inf) in zip(tensors.items(), f.tolist()):
            if has_nan or has_inf:
                bad.append(f"{'NaN' if has_nan else 'Inf'} in {name} of {what} on rank {rank}")
    if bad:
        raise NumericsError("; ".join(bad) + " -- check the inputs, the learning rate and loss scaling "
                            "(fully masked rows give 0, never NaN, so this comes from the values)")
