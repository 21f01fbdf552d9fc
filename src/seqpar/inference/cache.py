"""A KV cache sharded along the sequence: each sequence-parallel rank keeps the keys and values of its own tokens.

Nothing here communicates.  Every rank knows how many tokens every other rank
holds (:attr:`KVCache.lengths`): the prompt's split follows from the layout and
each decoded token goes to a rank chosen by the same deterministic rule on all
ranks (:meth:`KVCache.next_owner`), so the bookkeeping never needs a collective.

Per layer and rank the cache is ``[B, n_local, Hkv/t, D]`` (``t`` the tensor-parallel
degree; stored head-major): roped keys and values, in the order the rank received its tokens
(decode attends to every cached token, so the order does not matter).
Padding that :func:`~seqpar.inference.prefill` adds to split the prompt is never
stored, so it can never be attended.
"""
from __future__ import annotations

import torch

from ..core.errors import SeqParError, ShapeError, check
from ..core.mesh import Mesh

__all__ = ["KVCache", "LayerCache", "CacheError"]


class CacheError(SeqParError, ValueError):
    """A cache used with a model, mesh or batch it was not built for."""


class LayerCache:
    """Keys and values of this rank's tokens for one layer, ``[B, len, Hkv_local, D]``, growing.

    Stored head-major (``[B, Hkv, capacity, D]``) so that each head's keys are one contiguous
    block: decode reads the whole cache once per token, and attention kernels read a head's
    keys fastest that way (on CPU the flash kernel ran 1.3-1.6x faster on a head-major 8k cache
    than on a token-major one).  :attr:`k` / :attr:`v` are BSHD views of the live part.

    A layer holds the *last* ``len`` tokens of its rank (in the rank's token order): all of
    them, or, on a sliding-window layer, only those a future query can still see
    (:meth:`drop_front` forgets the others).  Storage has spare capacity (``reserve`` at
    creation); a full buffer first reuses the room freed at its front, then doubles, so
    appending one decoded token is a copy into place, amortised O(1).

    A decode step is a transaction: :meth:`begin` marks where it starts, :meth:`append` adds
    the step's token, and :meth:`commit` keeps it or :meth:`rollback` undoes it (a step that
    failed part-way leaves the layer as it was).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, reserve: int = 0):
        check(k.dim() == 4 and k.shape == v.shape, ShapeError,
              f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [batch, seq, kv_heads, head_dim]")
        b, s, h, d = k.shape
        self._k = k.new_empty(b, h, s + max(reserve, 0), d)
        self._v = v.new_empty(b, h, s + max(reserve, 0), d)
        self._start = self._end = 0  # the live tokens are storage slots [start, end)
        self._step = 0  # tokens appended since begin() (undone by rollback)
        self._write(k, v)

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        m = k.shape[1]
        self._k[:, :, self._end:self._end + m].copy_(k.transpose(1, 2))
        self._v[:, :, self._end:self._end + m].copy_(v.transpose(1, 2))
        self._end += m

    @property
    def len(self) -> int:
        """Live tokens."""
        return self._end - self._start

    @property
    def k(self) -> torch.Tensor:
        """``[B, len, Hkv_local, D]`` cached keys (a view of head-major storage)."""
        return self._k[:, :, self._start:self._end].transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        """``[B, len, Hkv_local, D]`` cached values (a view of head-major storage)."""
        return self._v[:, :, self._start:self._end].transpose(1, 2)

    @property
    def capacity(self) -> int:
        """Token slots allocated (live, freed at the front, and spare)."""
        return self._k.shape[2]

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens without reallocating later (live tokens move to the front)."""
        need, cap = self.len + extra, self.capacity
        if need > cap - self._start:
            size, live = max(need, cap), slice(self._start, self._end)
            if size == cap:  # compact in place, through a temporary: source and target may overlap
                moved = [(buf, buf[:, :, live].clone()) for buf in (self._k, self._v)]
            else:  # both buffers allocated before either replaces the old one: a failed allocation changes nothing
                moved = [(buf.new_empty(buf.shape[0], buf.shape[1], size, buf.shape[3]), buf[:, :, live])
                         for buf in (self._k, self._v)]
            for new, part in moved:
                new[:, :, :part.shape[2]] = part
            (self._k, _), (self._v, _) = moved
            self._start, self._end = 0, self.len

    def check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise a CacheError unless ``k, v [B, m, Hkv_local, D]`` fit this cache (batch, heads, dim, dtype).

        Decode calls it on every rank, not only on the rank that appends: the shapes are the same
        everywhere, so a cache used with another model fails on all ranks before the merge's
        collective instead of on one rank while the others wait in it.
        """
        b, h, _, d = self._k.shape
        check(k.dim() == 4 and (k.shape[0], k.shape[2], k.shape[3]) == (b, h, d) and k.shape == v.shape
              and k.dtype == v.dtype == self._k.dtype, CacheError,
              f"k {tuple(k.shape)} {k.dtype} / v {tuple(v.shape)} do not fit a cache of [B={b}, *, Hkv={h}, D={d}] "
              f"{self._k.dtype}: use the cache that prefill returned for this model and batch")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add ``k, v [B, m, Hkv_local, D]`` at the end (reuses freed room, else doubles the storage)."""
        self.check(k, v)
        m = k.shape[1]
        if self._end + m > self.capacity:
            # compact when at least half the buffer is free, else double: amortised O(1) copies per token
            self.reserve(max(m, self.len if 2 * self.len <= self.capacity else self.capacity))
        self._write(k, v)
        self._step += m

    def begin(self) -> None:
        """Start a decode step: the appends from here on are undone by :meth:`rollback`."""
        self._step = 0

    def commit(self) -> None:
        """End the step, keeping its appends."""
        self._step = 0

    def rollback(self) -> None:
        """Undo the appends since :meth:`begin`.  (Tokens :meth:`drop_front` forgot stay forgotten: the
        window only drops keys outside every later query's window, so they are never needed again.)"""
        self._end -= self._step
        self._step = 0

    def drop_front(self, count: int) -> None:
        """Forget the ``count`` oldest live tokens (outside every future query's sliding window)."""
        self._start += min(max(count, 0), self.len)

    def nbytes(self) -> int:
        """Bytes of the live part (keys and values)."""
        return 2 * self.k.numel() * self._k.element_size()

    def capacity_bytes(self) -> int:
        """Bytes allocated (live part plus spare capacity)."""
        return 2 * self._k.numel() * self._k.element_size()


class KVCache:
    """This rank's shard of a sequence-parallel KV cache: one :class:`LayerCache` per layer.

    Attributes:
        layers: per layer, this rank's ``[B, len, Hkv/t, D]`` keys and values.
        lengths: tokens held by each sequence-parallel rank (the same list on every rank).
        positions: ``[len]`` global positions of this rank's cached tokens, in cache order.
        prompt_len: real (unpadded) prompt tokens.
        rank, n: this rank's index in the sequence-parallel group and the group's size.
        mesh: the mesh the cache was filled on (its ``sp_group`` merges decode attention).

    Built by :func:`seqpar.inference.prefill` (which stores each layer's prompt keys with
    :meth:`fill`); advanced by :func:`seqpar.inference.decode_step`, one transaction per token:
    :meth:`begin`, one append per layer on the token's owner, then :meth:`commit` (or
    :meth:`rollback` if the step failed).
    """

    def __init__(self, *, mesh: Mesh, rank: int, n: int, lengths: list[int], positions: torch.Tensor, prompt_len: int,
                 num_layers: int, batch: int):
        check(len(lengths) == n and lengths[rank] == positions.numel(), ShapeError,
              f"lengths {lengths} do not describe {n} ranks with {positions.numel()} tokens on rank {rank}")
        self.mesh, self.rank, self.n = mesh, rank, n
        self.lengths = list(lengths)
        self._prompt_positions = positions
        self._decoded_positions: list[int] = []  # a list: one append per owned token, no tensor copy
        self.prompt_len = prompt_len
        self.batch = batch
        self.layers: list[LayerCache | None] = [None] * num_layers
        # this rank's positions ascend in cache order (every built-in layout; decoded tokens come later):
        # a sliding-window layer can then keep a suffix of the rank's tokens and forget a prefix
        self.ordered = bool((positions[1:] > positions[:-1]).all())

    @property
    def positions(self) -> torch.Tensor:
        """``[local_len]`` global positions of this rank's cached tokens, in cache order."""
        return torch.cat([self._prompt_positions, self._prompt_positions.new_tensor(self._decoded_positions)])

    @property
    def seq_len(self) -> int:
        """Tokens cached over all ranks: the prompt plus the decoded tokens fed back so far.

        Also the RoPE position of the next token.
        """
        return sum(self.lengths)

    @property
    def local_len(self) -> int:
        """Tokens this rank holds."""
        return self.lengths[self.rank]

    def next_owner(self) -> int:
        """The rank that stores the next token: the one holding the fewest (lowest rank on ties).

        Deterministic from :attr:`lengths`, so every rank agrees without communicating, and the
        shards stay balanced within one token once the prompt's own imbalance (padding) is absorbed.
        """
        return min(range(self.n), key=lambda r: (self.lengths[r], r))

    def reserve(self, extra: int) -> None:
        """Preallocate room for this rank's share of ``extra`` more tokens over all ranks."""
        share = -(-extra // self.n) + 1
        for layer in self.layers:
            if layer is not None:
                layer.reserve(share)

    def nbytes(self) -> int:
        """Bytes of keys and values this rank holds (filled part, all layers)."""
        return sum(layer.nbytes() for layer in self.layers if layer is not None)

    def capacity_bytes(self) -> int:
        """Bytes this rank has allocated for the cache (including spare capacity)."""
        return sum(layer.capacity_bytes() for layer in self.layers if layer is not None)

    def tail_positions(self, count: int) -> torch.Tensor:
        """``[count]`` global positions of this rank's last ``count`` cached tokens."""
        decoded = self._decoded_positions[max(0, len(self._decoded_positions) - count):]
        rest = count - len(decoded)
        prompt = self._prompt_positions[self._prompt_positions.numel() - rest:] if rest > 0 else \
            self._prompt_positions[:0]
        return torch.cat([prompt, prompt.new_tensor(decoded)])

    def fill(self, index: int, k: torch.Tensor, v: torch.Tensor, reserve: int = 0) -> LayerCache:
        """Store layer ``index``'s prompt keys and values ``[B, n, Hkv_local, D]`` (copied: never aliases
        the activations), with room for ``reserve`` more tokens.  Returns the new :class:`LayerCache`."""
        check(0 <= index < len(self.layers), CacheError,
              f"layer {index} is not a layer of this {len(self.layers)}-layer cache: the model's attention "
              f"modules must number their layers 0..{len(self.layers) - 1}")
        layer = self.layers[index] = LayerCache(k, v, reserve=reserve)
        return layer

    def layer(self, index: int) -> LayerCache:
        """Layer ``index``'s cache; a CacheError if prefill did not fill it."""
        check(0 <= index < len(self.layers), CacheError,
              f"layer {index} is not a layer of this {len(self.layers)}-layer cache: use the cache prefill "
              f"returned for this model")
        layer = self.layers[index]
        if layer is None:
            raise CacheError(f"layer {index} of the cache was never filled: use the cache prefill returned for "
                             f"this model")
        return layer

    def missing(self) -> list[int]:
        """Indices of the layers prefill did not fill (empty for a usable cache)."""
        return [i for i, layer in enumerate(self.layers) if layer is None]

    def begin(self) -> None:
        """Start a decode step: every layer's appends from here on are undone by :meth:`rollback`."""
        for layer in self.layers:
            if layer is not None:
                layer.begin()

    def commit(self, owner: int, position: int) -> None:
        """End the step: record its token, stored on rank ``owner`` at global ``position`` (call it after
        every layer appended, on every rank alike: all ranks keep the same :attr:`lengths`)."""
        check(0 <= owner < self.n, CacheError, f"owner {owner} is not a rank of this {self.n}-rank cache")
        for layer in self.layers:
            if layer is not None:
                layer.commit()
        self.lengths[owner] += 1
        if owner == self.rank:
            self._decoded_positions.append(position)

    def rollback(self) -> None:
        """Undo the appends of a decode step that failed part-way: the cache is as :meth:`begin` found it.
        (Tokens a window layer dropped stay dropped: they are outside the window of the step's query,
        and so of every later one.)"""
        for layer in self.layers:
            if layer is not None:
                layer.rollback()

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        layer = next((x for x in self.layers if x is not None), None)
        shape = "empty" if layer is None else f"[B={self.batch}, {self.local_len}, Hkv={layer.k.shape[2]}, " \
                                              f"D={layer.k.shape[3]}] x {len(self.layers)} layers"
        return f"KVCache(rank {self.rank}/{self.n}: {shape}; lengths={self.lengths}, seq_len={self.seq_len})"
