"""Batch sharding for the Hugging Face integration (no transformers import).

See :mod:`seqpar.integrations.hf` for the whole recipe.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.errors import ConfigError, ShapeError, check
from ..core.layout import get_layout, resolve_layout, shard
from ..core.mesh import Mesh, group_rank, resolve_mesh
from ..core.packing import SeqInfo
from ..train.loss import IGNORE_INDEX, shift_labels

__all__ = ["shard_batch", "cu_seqlens_from_position_ids", "INFO_KEY"]
#: the keyword under which shard_batch hands the packing/padding layout to the model; HF forwards every
#: extra keyword of ``model(...)`` down to the attention function, which reads it there.
INFO_KEY = "seqpar_info"

_BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


def check_mesh(mesh: Mesh) -> None:
    check(mesh.tp == 1, ConfigError,
          f"the Hugging Face integration does not shard weights (mesh has tp={mesh.tp}): use a mesh with tp=1 "
          f"(sequence and data parallel only), or seqpar.models for Megatron TP+SP")


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> list[int]:
    """Document boundaries ``[0, ..., S]`` of packed position ids ``[B, S]`` (or ``[S]``), shared by all rows.

    A document starts wherever the position does not continue the previous one
    by +1 (transformers' own rule in ``find_packed_sequence_indices``, so the
    single-process HF model masks the same documents); typically the ids
    restart at 0.  Every row must be packed the same way, because
    :func:`seqpar.attention` takes one ``cu_seqlens`` for the whole batch.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    check(pos.dim() == 2 and pos.shape[1] > 0, ShapeError,
          f"position_ids must be [B, S] or [S], got shape {tuple(position_ids.shape)}")
    pos = pos.detach().cpu()
    starts = torch.diff(pos, dim=1) != 1  # [B, S-1]: True where token t+1 starts a document
    check(bool((starts == starts[:1]).all()), ConfigError,
          "rows of position_ids are packed differently; seqpar.attention takes one cu_seqlens per batch: "
          "pack every row the same way, or put all documents in one row (batch size 1)")
    cuts = (torch.nonzero(starts[0]).flatten() + 1).tolist()
    return [0, *cuts, pos.shape[1]]


def shard_batch(batch: Mapping[str, torch.Tensor], mesh: Mesh | None = None, layout: str = "zigzag"
                ) -> dict[str, Any]:
    """This rank's part of a causal-LM batch, ready for ``model(**local)`` after :func:`~seqpar.integrations.hf.apply`.

    Args:
        batch: the *full* sequences of this data-parallel rank, identical on
            every rank of its sequence-parallel group:

            * ``input_ids`` ``[B, S]`` (any ``S``: documents are padded to what the layout needs);
            * ``labels`` ``[B, S]`` (optional), HF convention (unshifted, -100 = no loss);
              shifted here, before sharding, so ``labels[t]`` becomes the target of token ``t``;
            * ``position_ids`` ``[B, S]`` / ``[1, S]`` / ``[S]`` (optional): packed documents, a
              document starting wherever the ids do not continue by +1 (they restart at 0);
              every row packed alike (or B == 1);
            * ``attention_mask`` (optional) only if all ones: padding masks are refused
              (pack documents with ``position_ids`` instead).
        mesh: shard over ``mesh.sp_group`` (default: the default mesh).
        layout: sequence layout; must be the one given to ``apply``.

    Returns:
        ``input_ids`` ``[B, S_pad/sp]``; ``position_ids`` ``[B, S_pad/sp]`` (global
        positions, or positions within each document, for RoPE); ``labels`` and
        ``shift_labels`` (the same tensor, already shifted: HF's loss uses
        ``shift_labels`` as given and does not shift again; padding is -100;
        ``model(**local).loss`` is then this rank's *local* token mean, not the
        global one: pop both and use :func:`seqpar.train.causal_lm_loss`, which also
        saves HF's second pass over the logits);
        and ``seqpar_info``, the :class:`~seqpar.packing.SeqInfo` (documents,
        padding). HF passes every extra keyword of ``model(...)`` down to the
        attention function, which reads the packing layout from ``seqpar_info``
        there; carrying it with the batch (not in global state) keeps it correct
        under gradient checkpointing and with several models or batches in flight.

    No communication (each rank takes its positions of the replicated batch).
    """
    mesh = resolve_mesh(mesh)
    check_mesh(mesh)
    get_layout(layout)  # a clear error for an unknown name
    ids = _check_batch(batch)
    b, s = ids.shape
    pos, cu = _packing(batch.get("position_ids"), b, s)
    local_ids, info = shard(ids, 1, layout=layout, mesh=mesh, cu_seqlens=cu, return_info=True)
    if pos is not None:  # keep the caller's positions (a document may continue at an offset)
        local_pos = shard(pos, 1, layout=layout, mesh=mesh, cu_seqlens=info.cu_seqlens)
    else:
        rank = group_rank(mesh.sp_group)
        local_pos = info.position_ids(rank).to(ids.device).unsqueeze(0).expand(b, -1)
    out: dict[str, Any] = {"input_ids": local_ids, "position_ids": local_pos, INFO_KEY: info}
    labels = batch.get("labels")
    if labels is not None:
        out["labels"] = out["shift_labels"] = _shard_labels(labels, (b, s), info, mesh, layout)
    return out


def _check_batch(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``input_ids [B, S]`` of a batch shard_batch can shard, after its checks (keys, mask)."""
    check(isinstance(batch, Mapping) and "input_ids" in batch, ShapeError,
          "batch must be a dict with at least 'input_ids' [B, S]")
    extra = sorted(set(batch) - set(_BATCH_KEYS))
    check(not extra, ConfigError,
          f"shard_batch does not know how to shard {extra}: it takes {list(_BATCH_KEYS)}; shard other per-token "
          f"tensors with seqpar.shard(x, 1, cu_seqlens=..., layout=...) yourself")
    ids = batch["input_ids"]
    check(isinstance(ids, torch.Tensor) and ids.dim() == 2, ShapeError,
          f"input_ids must be a [B, S] tensor, got {getattr(ids, 'shape', type(ids))}")
    b, s = ids.shape
    mask = batch.get("attention_mask")
    if mask is not None:
        check(tuple(mask.shape) == (b, s), ShapeError,
              f"attention_mask {tuple(mask.shape)} must be [B, S] = {(b, s)}")
        check(bool(mask.bool().all()), ConfigError,
              "a padding attention_mask (zeros) is not supported with sequence parallelism: pack the sequences "
              "into one row with position_ids restarting at 0 at each document instead (seqpar derives cu_seqlens "
              "from them); right padding alone needs no mask in a causal LM: drop the mask and set its labels "
              "to -100")
    return ids


def _packing(pos: torch.Tensor | None, b: int, s: int) -> tuple[torch.Tensor | None, list[int] | None]:
    """``(position_ids [B, S], cu_seqlens)`` of packed documents, or ``(None, None)`` without position ids."""
    if pos is None:
        return None, None
    check(isinstance(pos, torch.Tensor) and pos.shape[-1] == s and pos.dim() in (1, 2)
          and (pos.dim() == 1 or pos.shape[0] in (1, b)), ShapeError,
          f"position_ids {tuple(pos.shape)} must be [B, S], [1, S] or [S] with S={s}")
    cu = cu_seqlens_from_position_ids(pos)
    return (pos if pos.dim() == 2 else pos.unsqueeze(0)).expand(b, s), cu


def _shard_labels(labels: torch.Tensor, shape: tuple[int, int], info: SeqInfo, mesh: Mesh, layout: str
                  ) -> torch.Tensor:
    """This rank's labels ``[B, S]``, shifted before sharding (``labels[t]`` the target of token ``t``; -100 on
    padding)."""
    b, s = shape
    check(isinstance(labels, torch.Tensor) and tuple(labels.shape) == (b, s), ShapeError,
          f"labels {tuple(getattr(labels, 'shape', ()))} must be [B, S] = {(b, s)} like input_ids")
    return shard(shift_labels(labels, list(info.cu_seqlens)), 1, layout=layout, mesh=mesh,
                 cu_seqlens=info.cu_seqlens, pad_value=IGNORE_INDEX)


def batch_info(info: SeqInfo | None, mesh: Mesh, layout: str, local_len: int) -> SeqInfo | None:
    """The ``seq_info`` to hand seqpar.attention for a batch from shard_batch (None: plain, unpadded)."""
    if info is None:
        return None
    check(isinstance(info, SeqInfo), ConfigError,
          f"{INFO_KEY} must be the SeqInfo from shard_batch, got {type(info).__name__}")
    lay = resolve_layout(layout, mesh.sp_group, mesh)
    check(info.n == mesh.sp and info.layout == lay, ConfigError,
          f"the batch was sharded as {info} but the model runs layout {layout!r} over sp={mesh.sp}: call "
          f"shard_batch with the mesh and layout given to apply()")
    check(info.local_len == local_len, ShapeError,
          f"{INFO_KEY} says {info.local_len} tokens per rank but the model got {local_len}: pass the "
          f"input_ids from the same shard_batch call")
    if info.padding == 0 and len(info.cu_seqlens) == 2:
        return None  # one unpadded sequence: the layout's closed-form plan is cheaper than per-token metadata
    return info
