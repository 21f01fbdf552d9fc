"""Training data: synthetic long-context recall tasks and memory-mapped token files.

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

__all__ = ["RecallTask", "LookupTask", "NeedleTask", "TokenFile", "make_data", "DATA_KEYS"]


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
        check(self.pairs >= 1, ConfigError, f"recall task: pairs={self.pairs} must be >= 1")
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
class LookupTask:
    """Key lookup across a long sequence: facts planted anywhere, questions at the very end.

    ``[filler ... (k1,v1)x r ... filler ... (k2,v2)x r ... filler] [SEP] [q1 q2 ... qQ]``: each fact is a
    token standing for a (key, value) pair, written ``repeat`` times in a row at a random depth of the
    whole context (split over ranks, on any rank's shard: with the zigzag layout rank 0 holds both ends
    of the sequence, the facts lie mostly elsewhere).  Each question is the key of one of the facts,
    and its label (at the question itself) is that fact's value.  Answers never appear in the input, so
    a question can only be answered from the facts, however often it is asked: one sequence gives
    ``questions`` labels, a strong signal per step.  Keys are distinct within a sequence.  One
    attention layer can learn it (a question's query matches the fact holding its key, whose value is
    copied); without attention over the whole sequence it stays at chance (1 / values).
    Tokens: 0 filler, 1 SEP, ``keys`` question tokens, ``values`` answer tokens, ``keys x values`` facts.
    ``answer="fact"`` labels a question with the fact's own token instead (a copy, which a model with
    tied embeddings learns faster); ``keys=1`` is passkey retrieval (one fact, asked at the end).
    """

    vocab_size: int
    seq_len: int
    pairs: int = 4
    keys: int = 8
    values: int = 16
    questions: int = 0  # 0: one per fact
    repeat: int = 1  # copies of each fact, side by side (a needle of `repeat` tokens)
    answer: str = "value"  # the label: "value" (the value's token) or "fact" (the fact's own token: a copy)
    seed: int = 0

    def __post_init__(self):
        self.questions = self.questions or self.pairs
        need = 2 + self.keys + self.values + self.keys * self.values
        for name, low in (("pairs", 1), ("keys", 1), ("values", 2), ("questions", 1)):
            value = getattr(self, name)
            check(value >= low, ConfigError, f"lookup task: {name}={value} must be >= {low}")
        check(need <= self.vocab_size, ConfigError,
              f"lookup task: {self.keys} keys x {self.values} values need a vocabulary of {need} tokens "
              f"(2 + keys + values + keys x values) but vocab_size={self.vocab_size}: raise vocab_size or lower "
              f"keys/values")
        check(self.pairs <= self.keys, ConfigError,
              f"lookup task: {self.pairs} pairs need {self.pairs} distinct keys but keys={self.keys}: "
              f"lower pairs or raise keys")
        check(self.repeat >= 1, ConfigError, f"lookup task: repeat={self.repeat} must be >= 1")
        check(self.answer in ("value", "fact"), ConfigError,
              f"lookup task: answer={self.answer!r}: use 'value' (the value's token) or 'fact' (a copy of the fact)")
        need = self.pairs * self.repeat + self.questions + 1
        check(need <= self.seq_len, ConfigError,
              f"lookup task: seq_len={self.seq_len} cannot hold {self.pairs} facts x {self.repeat} copies and "
              f"{self.questions} questions ({need} tokens): raise seq_len or lower pairs / repeat / questions")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(input_ids, labels)`` ``[batch, seq_len]`` for ``step``; labels already shifted."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        p, q, nk, nv, s = self.pairs, self.questions, self.keys, self.values, self.seq_len
        context = s - q - 1
        keys = torch.stack([torch.randperm(nk, generator=g)[:p] for _ in range(batch_size)])
        vals = torch.randint(0, nv, (batch_size, p), generator=g)
        r = self.repeat
        slots = torch.stack([torch.randperm(context // r, generator=g)[:p] for _ in range(batch_size)])
        where = (slots * r).repeat_interleave(r, 1) + torch.arange(r).repeat(p)  # each fact's r positions
        asked = torch.randint(0, p, (batch_size, q), generator=g)
        ids = torch.zeros(batch_size, s, dtype=torch.long)
        ids.scatter_(1, where, (2 + nk + nv + keys * nv + vals).repeat_interleave(r, 1))
        ids[:, context] = 1
        ids[:, context + 1:] = 2 + keys.gather(1, asked)
        labels = torch.full_like(ids, IGNORE)
        if self.answer == "fact":  # the answer is the fact's own token, copied from where it was planted
            labels[:, context + 1:] = 2 + nk + nv + (keys * nv + vals).gather(1, asked)
        else:
            labels[:, context + 1:] = 2 + nk + vals.gather(1, asked)  # at each question, its value
        return ids, labels


@dataclass
class NeedleTask:
    """Needles in a haystack, asked for from far away: passkey retrieval (``keys=1``) or multi-key.

    A haystack of random ``filler`` tokens.  In its first half ``pairs`` needles are planted at random
    depths: each a fact (a key and its value), one token written ``repeat`` times in a row.  In its
    second half ``questions`` question tokens sit at random positions, each the key of one of the
    sequence's needles and labelled (at itself) with that needle's token: the answer is a copy of a
    token planted on average half a sequence earlier, mostly on another rank's shard.  Needle tokens
    never occur in the haystack, so attention can find a needle by its content alone, at any distance;
    a question's answer occurs only in its needle, so without attention reaching back to it accuracy
    stays at chance (1 / values).  Every question is a label: dense supervision from each sequence.
    Keys are distinct within a sequence.  Tokens: ``0 .. filler-1`` haystack, then ``keys`` question
    tokens, then ``keys x values`` needles (key k, value v: ``filler + keys + k * values + v``).
    """

    vocab_size: int
    seq_len: int
    pairs: int = 1  # needles per sequence
    keys: int = 1  # distinct keys (question tokens)
    values: int = 16  # values per key (chance accuracy 1 / values)
    filler: int = 16  # haystack tokens
    questions: int = 64  # questions per sequence, in its second half
    repeat: int = 1  # copies of each needle, side by side
    seed: int = 0

    def __post_init__(self):
        for name, low in (("pairs", 1), ("keys", 1), ("values", 2), ("filler", 1), ("questions", 1),
                          ("repeat", 1)):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= low, ConfigError,
                  f"needle task: {name}={value} must be >= {low}")
        check(self.pairs <= self.keys, ConfigError,
              f"needle task: {self.pairs} pairs need {self.pairs} distinct keys but keys={self.keys}: lower pairs "
              f"or raise keys")
        need = self.filler + self.keys + self.keys * self.values
        check(need <= self.vocab_size, ConfigError,
              f"needle task: {self.filler} filler + {self.keys} keys + {self.keys} keys x {self.values} values need a "
              f"vocabulary of {need} tokens but vocab_size={self.vocab_size}: raise vocab_size or lower "
              f"filler / keys / values")
        half = self.seq_len // 2
        check(self.pairs * self.repeat <= half, ConfigError,
              f"needle task: seq_len={self.seq_len} cannot hold {self.pairs} facts x {self.repeat} copies in its "
              f"first half ({half} tokens): raise seq_len or lower pairs / repeat")
        check(self.questions <= self.seq_len - half, ConfigError,
              f"needle task: seq_len={self.seq_len} cannot hold {self.questions} questions in its second half "
              f"({self.seq_len - half} tokens): raise seq_len or lower questions")

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(input_ids, labels)`` ``[batch, seq_len]`` for ``step``; labels already shifted."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        b, s, p, q, r = batch_size, self.seq_len, self.pairs, self.questions, self.repeat
        nk, nv = self.keys, self.values
        half = s // 2
        ids = torch.randint(0, self.filler, (b, s), generator=g)
        keys = torch.stack([torch.randperm(nk, generator=g)[:p] for _ in range(b)])
        needle = self.filler + nk + keys * nv + torch.randint(0, nv, (b, p), generator=g)
        slots = torch.stack([torch.randperm(half // r, generator=g)[:p] for _ in range(b)])
        where = (slots * r).repeat_interleave(r, 1) + torch.arange(r).repeat(p)  # each needle's r positions
        ids.scatter_(1, where, needle.repeat_interleave(r, 1))
        at = half + torch.stack([torch.randperm(s - half, generator=g)[:q] for _ in range(b)])
        asked = torch.randint(0, p, (b, q), generator=g)
        ids.scatter_(1, at, self.filler + keys.gather(1, asked))
        labels = torch.full_like(ids, IGNORE)
        labels.scatter_(1, at, needle.gather(1, asked))  # at each question, a copy of its needle
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

        check(Path(self.path).is_file(), ConfigError,
              f"token file {self.path!r} does not exist (data.path; relative paths are from the working directory "
              f"{str(Path.cwd())!r})")
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


#: the keys of each kind of ``[data]`` table (a typo is refused, not ignored)
DATA_KEYS: dict[str, tuple[str, ...]] = {
    "recall": ("kind", "pairs"), "lookup": ("kind", "pairs", "keys", "values", "questions", "repeat", "answer"),
    "tokens": ("kind", "path", "dtype"), "needle": ("kind", "pairs", "keys", "values", "filler", "questions", "repeat")}
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")


def _int(spec: dict, key: str, default: int) -> int:
    value = spec.get(key, default)
    check(isinstance(value, int) and not isinstance(value, bool), ConfigError,
          f"data.{key} = {value!r} must be an integer")
    return value


def make_data(spec: dict, vocab_size: int, seq_len: int, seed: int):
    """Data source from a config section: ``{"kind": "recall", "pairs": 8}``, ``{"kind": "lookup", "pairs": 4,
    "keys": 8, "values": 16}``, ``{"kind": "needle", "pairs": 1, "keys": 1, "values": 16, "filler": 16,
    "questions": 64}`` or ``{"kind": "tokens", "path": ..., "dtype": "uint16"}``.

    Raises ConfigError naming an unknown kind or key (with the known ones), a bad value, a missing file.
    """
    check(isinstance(spec, dict), ConfigError, f"data must be a table (e.g. [data] kind = \"recall\"), got {spec!r}")
    kind = spec.get("kind", "recall")
    check(kind in DATA_KEYS, ConfigError, f"unknown data kind {kind!r}: use one of {', '.join(DATA_KEYS)}")
    unknown = sorted(set(spec) - set(DATA_KEYS[kind]))
    check(not unknown, ConfigError, f"unknown key(s) {unknown} in [data] (kind = {kind!r}): its keys are "
                                    f"{list(DATA_KEYS[kind])}")
    if kind == "recall":
        return RecallTask(vocab_size, seq_len, _int(spec, "pairs", 8), seed)
    if kind == "lookup":
        return LookupTask(vocab_size, seq_len, _int(spec, "pairs", 4), _int(spec, "keys", 8),
                          _int(spec, "values", 16), _int(spec, "questions", 0), _int(spec, "repeat", 1),
                          str(spec.get("answer", "value")), seed)
    if kind == "needle":
        return NeedleTask(vocab_size, seq_len, _int(spec, "pairs", 1), _int(spec, "keys", 1), _int(spec, "values", 16),
                          _int(spec, "filler", 16), _int(spec, "questions", 64), _int(spec, "repeat", 1), seed)
    check("path" in spec, ConfigError, "data.kind = 'tokens' needs data.path (a flat token file)")
    dtype = spec.get("dtype", "uint16")
    check(dtype in TOKEN_DTYPES, ConfigError, f"data.dtype = {dtype!r}: use one of {', '.join(TOKEN_DTYPES)}")
    return TokenFile(str(spec["path"]), seq_len, dtype, seed)
