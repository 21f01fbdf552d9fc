"""Vocabulary-parallel embedding: the ``[V, h]`` table split by rows over the tensor-parallel ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import Mesh
from . import mappings as mp
from ._base import TPModule, divisible, load_full, set_full, should_init, skip_init

__all__ = ["VocabParallelEmbedding"]


class VocabParallelEmbedding(TPModule):
    """``nn.Embedding`` with rank r holding rows ``[r*V/t, (r+1)*V/t)`` of the table.

    Input: token ids ``[B, S]`` (the same on every tp rank).  Each rank looks up the
    ids it owns, writes zeros for the others, and the partial rows are summed:

    * ``sequence_parallel=False``: all-reduce -> ``[B, S, h]`` replicated.
      Communication: all-reduce forward, none backward.
    * ``sequence_parallel=True``: reduce-scatter along ``seq_dim`` -> ``[B, S/t, h]``, this
      rank's sequence shard (S divisible by t), ready for sequence-parallel norms.
      Communication: reduce-scatter forward, all-gather of the gradient backward.

    ``num_embeddings`` must be divisible by t: pad the vocabulary (Megatron rounds it up to a
    multiple of ``make_vocab_size_divisible_by * t``); the extra rows are never looked up.
    Initialised like ``nn.Embedding`` (N(0, 1)) on the full table, then sharded.
    ``padding_idx`` as in ``nn.Embedding``: that row starts at zero and never gets a gradient
    (on the rank that owns it).
    Ids outside ``[0, V)`` raise on CPU tensors; on accelerators they are not checked
    (that would synchronise with the host) and give zero rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mesh: Mesh | None = None,
                 sequence_parallel: bool = False, seq_dim: int = 1, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(mesh)
        if padding_idx is not None:
            check(-num_embeddings <= padding_idx < num_embeddings, ConfigError,
                  f"padding_idx={padding_idx} is not a row of a {num_embeddings}-row embedding")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        divisible(embedding_dim, 1, "embedding_dim", "")
        self.per_rank = divisible(num_embeddings, self.tp_size, "VocabParallelEmbedding num_embeddings",
                                  f"pad the vocabulary to a multiple of {self.tp_size} (e.g. "
                                  f"{-(-num_embeddings // self.tp_size) * self.tp_size}); padded rows are never used")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype, device=device))
        self.weight.tensor_parallel, self.weight.partition_dim = True, 0
        # the padding row as a local row index, on the rank that owns it (None elsewhere)
        owned = padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end
        self._local_padding_idx = padding_idx - self.vocab_start if owned else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Embedding's N(0, 1) init of the full table, sharded."""
        if not should_init(self.weight):
            return
        full = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.weight.dtype, device=self.weight.device)
        nn.init.normal_(full)
        if self.padding_idx is not None:
            full[self.padding_idx].zero_()
        load_full(self.weight, full, self.tp_size, self.tp_rank, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check(not ids.is_floating_point() and not ids.is_complex(), ShapeError,
              f"VocabParallelEmbedding takes integer token ids, got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            check(0 <= lo and hi < self.num_embeddings, ShapeError,
                  f"token ids must lie in [0, {self.num_embeddings}), got range [{lo}, {hi}]")
        if self.sequence_parallel and self.tp_size > 1:
            check(-ids.dim() <= self.seq_dim < ids.dim(), ShapeError,
                  f"sequence_parallel=True needs ids with a sequence dim {self.seq_dim}, got shape {tuple(ids.shape)}")
            mp.check_seq_divisible(ids, self.seq_dim, self.tp_size, "VocabParallelEmbedding")
        if self.tp_size > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight,
                              padding_idx=self._local_padding_idx)
            # rows this rank does not own contribute zero (and get zero gradient)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight, padding_idx=self._local_padding_idx)
        if self.sequence_parallel:
            return mp.reduce_scatter_to_sequence_parallel_region(out, self.tp_group, self.seq_dim)
        return mp.reduce_from_tensor_parallel_region(out, self.tp_group)

    @classmethod
    def from_full(cls, embedding: nn.Embedding, *, mesh: Mesh | None = None, sequence_parallel: bool = False,
                  seq_dim: int = 1) -> VocabParallelEmbedding:
        """This rank's rows of a single-device ``nn.Embedding`` (no communication, no RNG use).

        ``padding_idx`` carries over; ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are refused
        (each needs the whole table or whole-batch counts on every rank).
        """
        for name, off in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            check(getattr(embedding, name, off) == off, ConfigError,
                  f"nn.Embedding({name}={getattr(embedding, name)}) has no vocabulary-parallel equivalent here: "
                  f"build the embedding without {name}")
        w = embedding.weight
        with skip_init():
            layer = cls(w.shape[0], w.shape[1], mesh=mesh, sequence_parallel=sequence_parallel, seq_dim=seq_dim,
                        padding_idx=embedding.padding_idx, dtype=w.dtype, device=w.device)
        load_full(layer.weight, w, layer.tp_size, layer.tp_rank, 0)
        return layer

    def to_full(self, *, grad: bool = False) -> nn.Embedding:
        """The equivalent ``nn.Embedding`` (all-gather of the rows over tp; every tp rank must call)."""
        w, gw = self._gather_param(self.weight, 0, grad)
        emb = torch.nn.utils.skip_init(nn.Embedding, w.shape[0], w.shape[1], padding_idx=self.padding_idx,
                                       device=w.device, dtype=w.dtype)
        set_full(emb.weight, w, gw)
        return emb

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows [{self.vocab_start}, {self.vocab_end}) of "
                f"tp={self.tp_size}), sequence_parallel={self.sequence_parallel}")
