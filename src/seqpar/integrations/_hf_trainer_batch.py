"""What the seqpar Trainer does to a collated Hugging Face batch before sharding it (no transformers import).

HF collators hand a batch in one of three shapes; :func:`sequence_batch` turns each into
what :func:`~seqpar.integrations.hf.shard_batch` takes (``input_ids``, ``labels``,
``position_ids``), exactly as the stock model would see it on one device:

* **padded rows** (``DataCollatorWithPadding``, ``DataCollatorForLanguageModeling``, TRL
  without packing): right padding with an ``attention_mask``.  In a causal LM no real
  token attends to the padding after it, so the mask is dropped and the padding gets no
  target; the pad tokens continue the positions of their row.  Left padding is refused.
* **flattened documents** (``DataCollatorWithFlattening``, TRL ``padding_free`` / BFD
  packing): one row, ``position_ids`` restarting at every document.  They become
  ``cu_seqlens`` in shard_batch.  HF's flash-attention keywords (``cu_seq_lens_q/k``,
  ``max_length_q/k``, ``seq_idx``) are checked against the positions and dropped.
* **rows packed differently** (several rows, each with its own documents): the rows are
  laid end to end in one row (seqpar takes one ``cu_seqlens`` per batch), and
  :class:`SequenceBatch` keeps the shape to give the logits back per row.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError, ShapeError, check
from ..train.loss import IGNORE_INDEX, shift_labels
from ._hf_batch import cu_seqlens_from_position_ids

__all__ = ["SequenceBatch", "sequence_batch", "count_targets", "VARLEN_KEYS"]

#: keywords HF's flash-attention path takes for packed rows; seqpar derives the same boundaries from position_ids
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
#: per-token keys a causal-LM batch may carry into the model; anything else is refused (it would not be sharded)
_TOKEN_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "shift_labels")
#: per-call switches the model may take as they are (not per token)
_PASS_THROUGH = ("use_cache", "return_dict", "output_hidden_states", "logits_to_keep", "num_items_in_batch",
                 "return_loss")


@dataclass
class SequenceBatch:
    """A batch ready for shard_batch, and how to give per-token outputs back the collator's shape."""

    #: ``input_ids``, ``labels`` (when given) and ``position_ids`` (when packed) for shard_batch
    tensors: dict[str, torch.Tensor]
    #: ``(B, S)`` of the collated batch
    shape: tuple[int, int]
    #: rows were laid end to end into one row
    flattened: bool
    #: tokens of the collated batch that are not padding (int64 scalar on the batch's device)
    real_tokens: torch.Tensor

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Full per-token outputs ``[1 or B, S', ...]`` in the collator's shape ``[B, S, ...]``."""
        return x.reshape(*self.shape, *x.shape[2:]) if self.flattened else x


def _positions_from_cu(cu: Any, length: int, device: torch.device) -> torch.Tensor:
    bounds = [int(c) for c in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)]
    check(len(bounds) >= 2 and bounds[0] == 0 and bounds[-1] == length
          and all(a < b for a, b in zip(bounds, bounds[1:])), ShapeError,
          f"cu_seq_lens_q {bounds} must rise from 0 to the sequence length {length}")
    return torch.cat([torch.arange(b - a, device=device) for a, b in zip(bounds, bounds[1:])]).unsqueeze(0)


def _varlen_positions(batch: dict[str, Any], ids: torch.Tensor) -> torch.Tensor | None:
    """position_ids of a padding-free batch, checked against HF's cu_seq_lens when the collator gave both."""
    cu = batch.get("cu_seq_lens_q")
    pos = batch.get("position_ids")
    if cu is None:
        return pos
    check(ids.shape[0] == 1, ShapeError,
          f"cu_seq_lens_q describes one flattened row, but input_ids has {ids.shape[0]} rows")
    from_cu = _positions_from_cu(cu, ids.shape[1], ids.device)
    if pos is None:
        return from_cu
    check(cu_seqlens_from_position_ids(pos) == cu_seqlens_from_position_ids(from_cu), ConfigError,
          "the batch's cu_seq_lens_q and position_ids disagree on where documents start: fix the collator")
    return pos


def _drop_right_padding(batch: dict[str, Any], mask: torch.Tensor) -> None:
    ids = batch["input_ids"]
    check(tuple(mask.shape) == tuple(ids.shape), ShapeError,
          f"attention_mask {tuple(mask.shape)} must be [B, S] = {tuple(ids.shape)} (seqpar applies the causal and "
          f"document masks itself; a 4-D mask cannot be sharded)")
    keep = mask.bool()
    if bool(keep.all()):
        return
    # right padding: each row is ones then zeros, so the mask never rises along a row
    check(not bool((keep[:, 1:] & ~keep[:, :-1]).any()), ConfigError,
          "the batch is left-padded (or has holes in its attention_mask): with sequence parallelism padding masks "
          "cannot be applied to a sharded sequence; pad on the right (tokenizer.padding_side = 'right'), or pack "
          "documents with DataCollatorWithFlattening / TRL padding_free")
    labels = batch.get("labels")
    if labels is not None:
        batch["labels"] = labels.masked_fill(~keep, IGNORE_INDEX)
    pos = batch.get("position_ids")
    if pos is not None:  # pad tokens continue their row's positions: no new document starts inside the padding
        pos = pos.expand_as(ids) if pos.dim() == 2 else pos.unsqueeze(0).expand_as(ids)
        last = (pos * keep).amax(dim=1, keepdim=True)
        after = torch.cumsum((~keep).long(), dim=1)
        batch["position_ids"] = torch.where(keep, pos, last + after)


def _flatten_rows(batch: dict[str, Any]) -> bool:
    """Lay rows packed unlike each other end to end in one row; True if it did."""
    ids, pos = batch["input_ids"], batch.get("position_ids")
    if pos is None or ids.shape[0] == 1 or pos.dim() == 1 or pos.shape[0] == 1:
        return False
    starts = torch.diff(pos, dim=1) != 1
    if bool((starts == starts[:1]).all()):
        return False  # packed alike: shard_batch takes them as they are
    check(not bool((pos[1:, 0] == pos[:-1, -1] + 1).any()), ConfigError,
          "rows are packed differently and a row's first position continues the previous row's last one, so laid "
          "end to end they would read as one document: start every row at a document boundary (position 0), or "
          "pack every row alike")
    for key in ("input_ids", "labels", "position_ids"):
        if batch.get(key) is not None:
            batch[key] = batch[key].reshape(1, -1)
    return True


def sequence_batch(inputs: Mapping[str, Any]) -> SequenceBatch:
    """The collated batch ``inputs`` as shard_batch's input (see the module docs).  No communication.

    Args:
        inputs: a collator's output: ``input_ids`` ``[B, S]`` and optionally ``labels`` (HF convention, unshifted),
            ``position_ids``, ``attention_mask`` (right padding), HF's varlen keys, ``use_cache``-style switches.

    Returns:
        a :class:`SequenceBatch`.  Raises ConfigError for what cannot be sharded exactly (left padding, 4-D masks,
        pre-shifted ``shift_labels``, unknown per-token keys).
    """
    check(isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor)
          and inputs["input_ids"].dim() == 2, ShapeError,
          "a causal-LM batch needs input_ids [B, S] (the seqpar Trainer trains causal LMs on token ids)")
    extra = sorted(set(inputs) - set(_TOKEN_KEYS) - set(VARLEN_KEYS) - set(_PASS_THROUGH))
    check(not extra, ConfigError,
          f"the batch has keys {extra} that the seqpar Trainer cannot shard over the sequence: it shards input_ids, "
          f"labels, position_ids and a right-padding attention_mask; drop the others in the collator")
    check(inputs.get("shift_labels") is None, ConfigError,
          "the batch already has shift_labels: seqpar shifts labels itself, per document, before sharding; give "
          "unshifted labels (HF convention)")
    batch = {k: inputs[k] for k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q")
             if inputs.get(k) is not None}
    ids = batch["input_ids"]
    if batch.get("labels") is not None:
        check(tuple(batch["labels"].shape) == tuple(ids.shape), ShapeError,
              f"labels {tuple(batch['labels'].shape)} must be [B, S] = {tuple(ids.shape)} like input_ids")
    pos = _varlen_positions(batch, ids)
    batch.pop("cu_seq_lens_q", None)
    if pos is not None:
        batch["position_ids"] = pos
    mask = inputs.get("attention_mask")
    if mask is not None:
        _drop_right_padding(batch, mask)
    real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
    shape = (int(ids.shape[0]), int(ids.shape[1]))
    flattened = _flatten_rows(batch)
    return SequenceBatch(tensors=batch, shape=shape, flattened=flattened, real_tokens=real.long())


def count_targets(batch: SequenceBatch) -> torch.Tensor:
    """Tokens with a next-token target in ``batch`` (int64 scalar on its device): the loss's denominator.

    The count :func:`seqpar.train.causal_lm_loss` reaches after sharding: labels shifted per document
    (no target across a document boundary), ``-100`` ignored.  No communication.
    """
    labels = batch.tensors.get("labels")
    if labels is None:
        return torch.zeros((), dtype=torch.long, device=batch.tensors["input_ids"].device)
    pos = batch.tensors.get("position_ids")
    cu = cu_seqlens_from_position_ids(pos) if pos is not None else None
    return (shift_labels(labels, cu) != IGNORE_INDEX).sum()
