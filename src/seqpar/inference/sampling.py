"""Choosing the next token from (vocabulary-parallel) logits, identically on every rank.

Greedy decoding needs one tiny all-gather over tp (:func:`~seqpar.tp.cross_entropy.vocab_parallel_argmax`).
Sampling gathers the vocabulary shards (tp > 1), draws from a generator seeded the same way on
every rank, and then makes the draw of one rank everyone's: logits agree across ranks only up
to rounding, and one token that differs between ranks would make them cache different
sequences.  That costs two all-reduces of ``[B]`` integers per token (sp, then tp).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import comm
from ..core.errors import ConfigError, check
from ..core.mesh import Mesh, group_size
from ..tp.cross_entropy import vocab_parallel_argmax

__all__ = ["Sampler"]


@dataclass
class Sampler:
    """How :func:`seqpar.inference.generate` picks tokens (HF's ``generate`` keywords and meaning).

    Attributes:
        do_sample: draw from the softmax of the warped logits; False = greedy (argmax).
        temperature: logits are divided by it (> 0) before sampling.
        top_k: keep the ``top_k`` most likely tokens (None or 0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (None or 1: all).
        seed: seeds the draws (the same on every rank).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.temperature > 0 or not self.do_sample, ConfigError,
              f"temperature={self.temperature} must be > 0 when sampling (do_sample=False decodes greedily)")
        check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0), ConfigError,
              f"top_k={self.top_k!r} must be an int >= 0 (0 or None: no top-k filter)")
        check(self.top_p is None or 0 < self.top_p <= 1, ConfigError, f"top_p={self.top_p} must be in (0, 1]")
        self._gen: torch.Generator | None = None

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B, V]`` probabilities after temperature, top-k and top-p (float32)."""
        x = logits.float() / self.temperature
        if self.top_k:
            kth = x.topk(min(self.top_k, x.shape[-1]), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_x, order = x.sort(dim=-1, descending=True)
            p = sorted_x.softmax(-1)
            beyond = p.cumsum(-1) - p >= self.top_p  # the more likely tokens already reach top_p (never the first)
            x = x.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
        return x.softmax(-1)

    def next_tokens(self, logits: torch.Tensor, mesh: Mesh) -> torch.Tensor:
        """``[B]`` next token ids, the same on every rank, from this rank's logits ``[B, V/t]``.

        Communication: greedy, an all-gather of 2 values per sequence over tp; sampling, an
        all-gather of the logits over tp (tp > 1) and two all-reduces of ``[B]`` ids (sp, tp).
        """
        if not self.do_sample:
            return vocab_parallel_argmax(logits, group=mesh.tp_group)
        full = comm.all_gather(logits, -1, mesh.tp_group) if mesh.tp > 1 else logits
        if self._gen is None or self._gen.device != full.device:
            self._gen = torch.Generator(device=full.device).manual_seed(self.seed)
        tokens = torch.multinomial(self.warp(full), 1, generator=self._gen)[:, 0]
        for name in ("sp", "tp"):  # rank 0's draw everywhere: a sum with zeros elsewhere
            group = mesh.group(name)
            if group_size(group) > 1:
                tokens = comm.all_reduce(tokens if mesh.rank(name) == 0 else torch.zeros_like(tokens), group)
        return tokens
