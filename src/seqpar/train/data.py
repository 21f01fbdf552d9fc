"""Training data: a synthetic long-context recall task and memory-mapped token files.

Both produce the *global* batch of a step deterministically from (seed, step), so
every rank builds the same batch and takes its own rows (dp) and tokens (sp):
no data loader process, no broadcast, and a resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ConfigError, check
from .loss import IGNORE

__all__ = ["RecallTask", "TokenFile", "make_data"]


@dataclass
class RecallTask:
    """Associative recall across a long sequence.

    ``[k1 v1 k2 v2 ... kP vP] [filler ...] [SEP] [q1 a1 q2 a2 ... qP aP]``: the
    key/value pairs sit at the start, the queries (keys in a new order) at the
    end, and the loss is on each answer.  With the sequence split over ranks
    the pairs and the queries live on different shards, so only attention over
    the whole sequence can answer.  Tokens: 0 filler, 1 SEP, keys, values.
    """

    vocab_size: int
    seq_len: int
    pairs: int = 8
    seed: int = 0

    def __post_init__(self):
        self.n_keys = (self.vocab_size - 2) // 2
        check(self.pairs <= self.n_keys, ConfigError,
              f"recall task: {self.pairs} pairs need {self.pairs} distinct keys but vocab_size={self.vocab_size} "
              f"gives {self.n_keys}: raise vocab_size or lower pairs")
        check(4 * self.pairs + 1 <= self.seq_len, ConfigError,
              f"recall task: seq_len={self.seq_len} cannot hold {self.pairs} pairs and their queries "
              f"({4 * self.pairs + 1} tokens): raise seq_len or lower pairs")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(input_ids, labels)`` ``[batch, seq_len]`` for ``step``; labels already shifted."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        p, k = self.pairs, self.n_keys
        keys = torch.stack([torch.randperm(k, generator=g)[:p] for _ in range(batch_size)]) + 2
        vals = torch.randint(2 + k, 2 + 2 * k, (batch_size, p), generator=g)
        order = torch.stack([torch.randperm(p, generator=g) for _ in range(batch_size)])
        ctx = torch.stack([keys, vals], -1).flatten(1)
        qry = torch.stack([keys.gather(1, order), vals.gather(1, order)], -1).flatten(1)
        filler = torch.zeros(batch_size, self.seq_len - 4 * p - 1, dtype=torch.long)
        sep = torch.ones(batch_size, 1, dtype=torch.long)
        ids = torch.cat([ctx, filler, sep, qry], dim=1)
        labels = torch.full_like(ids, IGNORE)
        start = self.seq_len - 2 * p
        labels[:, start::2] = vals.gather(1, order)  # at each query key, the target is its value
        return ids, labels


@dataclass
class TokenFile:
    """Random windows of a flat file of token ids (``numpy.memmap``; uint16, uint32 or int32)."""

    path: str
    seq_len: int
    dtype: str = "uint16"
    seed: int = 0

    def __post_init__(self):
        import numpy as np

        check(Path(self.path).is_file(), ConfigError, f"token file {self.path!r} does not exist")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        check(len(self.tokens) > self.seq_len + 1, ConfigError,
              f"token file {self.path!r} holds {len(self.tokens)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch_size,), generator=g).tolist()
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        window = torch.from_numpy(rows)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def make_data(spec: dict, vocab_size: int, seq_len: int, seed: int):
    """Data source from a config section: ``{"kind": "recall", "pairs": 8}`` or ``{"kind": "tokens", "path": ...}``."""
    kind = spec.get("kind", "recall")
    if kind == "recall":
        return RecallTask(vocab_size, seq_len, int(spec.get("pairs", 8)), seed)
    if kind == "tokens":
        check("path" in spec, ConfigError, "data.kind = 'tokens' needs data.path (a flat token file)")
        return TokenFile(spec["path"], seq_len, spec.get("dtype", "uint16"), seed)
    raise ConfigError(f"unknown data kind {kind!r}: use 'recall' or 'tokens'")
