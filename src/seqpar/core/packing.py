"""Packed variable-length sequences and padding, laid out over a sequence-parallel group.

``cu_seqlens`` follows flash-attn's varlen convention: cumulative document
lengths over the packed global sequence, ``[0, len_0, len_0 + len_1, ..., S]``.
Each document is laid out over the N ranks *on its own* (zigzag per document),
so every rank gets an equal share of every document and causal work stays
balanced whatever the mix of lengths.  A document whose length the layout
cannot split (zigzag needs a multiple of 2N) is padded at its end; padding
tokens have document id -1: they attend nothing and nothing attends them, and
their outputs and gradients are zero.  A plain sequence of any length is the
one-document case (``cu_seqlens=[0, S]``).  :class:`SeqInfo` says where the
padding went; nothing is ever silently truncated.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from .errors import ShapeError, check
from .masks import TokenMeta

if TYPE_CHECKING:  # layout imports this module
    from .layout import Layout

__all__ = ["SeqInfo", "seq_info", "layout_unit"]


def layout_unit(layout, n: int) -> int:
    """Tokens each packed document (or a padded sequence) is padded to a multiple of: ``n * layout.granule``
    (zigzag: two chunks per rank)."""
    return n * layout.granule


@dataclass(frozen=True, eq=False)
class SeqInfo:
    """How a (packed, possibly padded) global sequence is spread over ``n`` ranks in ``layout``."""

    layout: Layout
    n: int
    cu_seqlens: tuple[int, ...]
    padded_cu_seqlens: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        """Tokens before padding."""
        return self.cu_seqlens[-1]

    @property
    def padded_len(self) -> int:
        return self.padded_cu_seqlens[-1]

    @property
    def padding(self) -> int:
        """Padding tokens added in all (0 when every document already splits evenly)."""
        return self.padded_len - self.seq_len

    @property
    def local_len(self) -> int:
        """Tokens per rank, padding included."""
        return self.padded_len // self.n

    @property
    def packed(self) -> bool:
        """More than one document, or padding: attention needs the per-token metadata."""
        return len(self.cu_seqlens) > 2 or self.padding > 0

    def same_split(self, other: SeqInfo) -> bool:
        """True when ``other`` places every token where this one does (layout, ranks, documents, padding)."""
        return self is other or (self.n == other.n and self.layout == other.layout
                                 and self.cu_seqlens == other.cu_seqlens
                                 and self.padded_cu_seqlens == other.padded_cu_seqlens)

    def describe(self) -> str:
        """Layout and packing in words, for error messages."""
        docs = len(self.cu_seqlens) - 1
        what = (f"{docs} packed documents (cu_seqlens={list(self.cu_seqlens[:6])}{'...' if docs > 5 else ''})"
                if docs > 1 else f"one sequence of {self.seq_len} tokens")
        pad = f", padded to {self.padded_len}" if self.padding else ""
        return f"layout {self.layout.name!r} over {self.n} ranks, {what}{pad}"

    @property
    def doc_padding(self) -> list[int]:
        """Padding added at the end of each document."""
        return [(pe - ps) - (e - s) for s, e, ps, pe in zip(self.cu_seqlens, self.cu_seqlens[1:],
                                                           self.padded_cu_seqlens, self.padded_cu_seqlens[1:])]

    def indices(self, rank: int) -> torch.Tensor:
        """Positions in the *padded* global sequence held by ``rank``, in local order."""
        return self._indices[rank]

    @cached_property
    def _indices(self) -> list[torch.Tensor]:
        starts, ends = self.padded_cu_seqlens[:-1], self.padded_cu_seqlens[1:]
        return [torch.cat([s + self.layout.indices(e - s, self.n, r) for s, e in zip(starts, ends)])
                for r in range(self.n)]

    @cached_property
    def gather_order(self) -> torch.Tensor | None:
        """For the rank-major concatenation of every rank's shard, the index of each padded position in it;
        None when that concatenation is already in order (contiguous layout, no packing)."""
        perm = torch.cat(self._indices)
        if torch.equal(perm, torch.arange(perm.numel())):
            return None
        return torch.argsort(perm)

    def on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """``getattr(self, name)`` (an index tensor, or a rank's ``indices:<rank>``) moved to ``device``, cached:
        the shard and unshard of every layer reuse one copy instead of a host-to-device transfer per call."""
        key = (name, str(device))
        hit = self._device_cache.get(key)
        if hit is None and key not in self._device_cache:
            t = self.indices(int(name.split(":")[1])) if name.startswith("indices:") else getattr(self, name)
            hit = self._device_cache[key] = None if t is None else t.to(device)
        return hit

    @cached_property
    def _device_cache(self) -> dict:
        return {}

    @cached_property
    def _padded_meta(self) -> TokenMeta:
        pos = torch.empty(self.padded_len, dtype=torch.long)
        doc = torch.empty(self.padded_len, dtype=torch.long)
        for d, (s, e, ps, pe) in enumerate(zip(self.cu_seqlens, self.cu_seqlens[1:],
                                               self.padded_cu_seqlens, self.padded_cu_seqlens[1:])):
            pos[ps:pe] = torch.arange(pe - ps)
            doc[ps:pe] = d
            doc[ps + (e - s):pe] = -1
        return TokenMeta(pos, doc)

    def meta(self, rank: int) -> TokenMeta:
        """Per-token position within its document and document id (-1 = padding) of ``rank``'s tokens."""
        idx = self.indices(rank)
        return TokenMeta(self._padded_meta.pos[idx], self._padded_meta.doc[idx])

    def position_ids(self, rank: int) -> torch.Tensor:
        """RoPE positions of ``rank``'s tokens: restarting at 0 in every document."""
        return self.meta(rank).pos

    @cached_property
    def source_index(self) -> torch.Tensor:
        """For each padded position, its index in the unpadded sequence, or -1 for padding."""
        src = torch.full((self.padded_len,), -1, dtype=torch.long)
        for s, e, ps in zip(self.cu_seqlens, self.cu_seqlens[1:], self.padded_cu_seqlens):
            src[ps:ps + (e - s)] = torch.arange(s, e)
        return src

    def pad(self, x: torch.Tensor, dim: int, value: float = 0) -> torch.Tensor:
        """Insert ``value`` after each document: ``[.., S, ..] -> [.., S_padded, ..]`` (differentiable).

        Pad labels with -100 so padding never counts in a loss.
        """
        if self.padding == 0:
            return x
        src = self.source_index
        keep = src >= 0
        shape = list(x.shape)
        shape[dim] = self.padded_len
        out = x.new_full(shape, value)
        return out.index_copy(dim, torch.nonzero(keep).flatten().to(x.device), x)

    def unpad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Drop the padding: ``[.., S_padded, ..] -> [.., S, ..]`` (differentiable)."""
        if self.padding == 0:
            return x
        return x.index_select(dim, torch.nonzero(self.source_index >= 0).flatten().to(x.device))

    def __repr__(self) -> str:
        return (f"SeqInfo(layout={self.layout.name}, n={self.n}, docs={len(self.cu_seqlens) - 1}, "
                f"seq_len={self.seq_len}, padded_len={self.padded_len}, padding={self.doc_padding})")


def _as_tuple(cu_seqlens) -> tuple[int, ...]:
    if isinstance(cu_seqlens, torch.Tensor):
        check(cu_seqlens.dim() == 1, ShapeError, f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
        check(not (cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool),
              ShapeError, f"cu_seqlens must hold integers (int32 or int64, as flash-attn's varlen API takes), got "
              f"{cu_seqlens.dtype}: a float would be truncated; pass cu_seqlens.long()")
        cu_seqlens = cu_seqlens.tolist()
    check(isinstance(cu_seqlens, (list, tuple)), ShapeError,
          f"cu_seqlens must be a 1-D integer tensor or a list of ints, got {type(cu_seqlens).__name__}")
    bad = [c for c in cu_seqlens if isinstance(c, bool) or not isinstance(c, int)]
    if bad:
        raise ShapeError(f"cu_seqlens must hold integers, got {bad[0]!r} ({type(bad[0]).__name__}): "
                         f"a float would be truncated; pass integer offsets")
    cu = tuple(cu_seqlens)
    check(len(cu) >= 2 and cu[0] == 0, ShapeError,
          f"cu_seqlens must start at 0 and hold at least one document, got {list(cu)[:8]}")
    check(all(b > a for a, b in zip(cu, cu[1:])), ShapeError,
          f"cu_seqlens must be strictly increasing (every document non-empty), got {list(cu)[:16]}")
    return cu


def seq_info(layout, n: int, *, cu_seqlens=None, seq_len: int | None = None, exact: bool = False) -> SeqInfo:
    """Layout of a packed sequence (``cu_seqlens``) or a plain one of any length (``seq_len``) over ``n`` ranks.

    Every document is padded to a multiple of ``n * layout.granule`` tokens; with ``exact`` (a plain
    sequence the caller checked splits as it is: any length on one process) nothing is padded.
    No communication.
    """
    check((cu_seqlens is None) != (seq_len is None), ShapeError, "give exactly one of cu_seqlens and seq_len")
    if isinstance(cu_seqlens, torch.Tensor):
        return _tensor_seq_info(layout, n, cu_seqlens)
    return _seq_info(layout, n, _as_tuple(cu_seqlens if cu_seqlens is not None else [0, seq_len]),
                     1 if exact else layout_unit(layout, n))


def _seq_info(layout, n: int, cu: tuple[int, ...], unit: int) -> SeqInfo:
    key = (layout, n, cu, unit)
    info = _BY_TUPLE.get(key)
    if info is None:
        padded = [0]
        for a, b in zip(cu, cu[1:]):
            padded.append(padded[-1] + -(-(b - a) // unit) * unit)
        info = SeqInfo(layout, n, cu, tuple(padded))
        if len(_BY_TUPLE) >= _CACHE_SIZE:
            _BY_TUPLE.pop(next(iter(_BY_TUPLE)))
        _BY_TUPLE[key] = info
    return info


def _tensor_seq_info(layout, n: int, cu_seqlens: torch.Tensor) -> SeqInfo:
    """SeqInfo of a cu_seqlens tensor, read once per tensor (and version): every layer of a step passes the
    same tensor, and reading a CUDA tensor on the host would stall the GPU on each of them."""
    key = (id(cu_seqlens), layout, n)
    hit = _BY_TENSOR.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    info = _seq_info(layout, n, _as_tuple(cu_seqlens), layout_unit(layout, n))
    if len(_BY_TENSOR) >= _CACHE_SIZE:
        _BY_TENSOR.pop(next(iter(_BY_TENSOR)))
    _BY_TENSOR[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, info)
    return info


# SeqInfos are immutable: one per (layout, ranks, documents), so plans cached on them are shared by every layer
_CACHE_SIZE = 256
_BY_TUPLE: dict = {}
_BY_TENSOR: dict = {}
