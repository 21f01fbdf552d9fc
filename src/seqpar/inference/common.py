"""The model-independent pieces of prefill and decode (every adapter's model goes through them).

* :func:`check_prompt`, :func:`check_tokens`: the input checks every rank makes before any
  collective.
* :func:`split_prompt`: how a prompt splits over the sequence-parallel group (padded at its
  end when the layout needs it), as a :class:`~seqpar.packing.SeqInfo`.
* :func:`new_cache`: this rank's empty :class:`~seqpar.inference.KVCache` for that split.
* :func:`token_owner`: which rank holds a given prompt token, and where.
* :func:`decode_attention`: one layer of decode: append the new token on its owner, attend
  the replicated query to the local shard, merge the ranks' partials (:func:`merge_over_group`).
* :func:`window_keys`: which cached keys a sliding window leaves visible to the new token.
"""
from __future__ import annotations

import torch

from ..core import comm
from ..core.debug import check_agree, debug_enabled
from ..core.errors import ShapeError, check
from ..core.kernels import accumulation_dtype, attention_with_lse, merge_into
from ..core.layout import resolve_layout
from ..core.mesh import Mesh, group_rank, group_size
from ..core.packing import SeqInfo
from .cache import KVCache, LayerCache

__all__ = ["check_prompt", "check_tokens", "split_prompt", "new_cache", "token_owner", "decode_attention",
           "merge_over_group", "window_keys"]


def split_prompt(layout, mesh: Mesh, s: int, pad: bool, tp_cut: int = 1) -> SeqInfo:
    """How a prompt of ``s`` tokens splits over ``mesh.sp_group`` in ``layout``, padded at its end.

    Args:
        layout: a layout name or object (on a 2-D mesh a name means the nested layout).
        s: prompt length.
        pad: pad to the next length the layout can split; ``False`` raises a ShapeError instead.
        tp_cut: how many times each rank's shard is cut again (tp with Megatron sequence parallelism).
    Returns:
        a single-document SeqInfo: ``cu_seqlens = (0, s)``, ``padded_cu_seqlens = (0, padded)``.
    No communication.
    """
    group = mesh.sp_group
    n = group_size(group)
    lay = resolve_layout(layout, group, mesh)
    unit = n * lay.granule * tp_cut
    padded = -(-s // unit) * unit
    check(pad or padded == s, ShapeError,
          f"prompt length {s} does not split over sp={n}" + (f" x tp={tp_cut}" if tp_cut > 1 else "") +
          f" in layout {lay.name!r} (needs a multiple of {unit}): pass pad=True (padding is masked in prefill "
          f"and never cached) or give a prompt of a multiple of {unit} tokens")
    return SeqInfo(lay, n, (0, s), (0, padded))


_WHY = "every rank must feed the same tokens: the ranks' shards would belong to different sequences"


def check_prompt(input_ids, reserve: int, group) -> None:
    """Raise a ShapeError (on every rank alike, before any collective) for a malformed prompt.

    In debug mode (``SEQPAR_DEBUG=1``) also checks that every rank of ``group`` passes the same
    prompt (a fingerprint of its ids): one all-gather of a short string.
    """
    check(isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0
          and not input_ids.is_floating_point(), ShapeError,
          f"input_ids must be the full prompt as integer ids [batch, seq] with seq > 0, got "
          f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    check(isinstance(reserve, int) and reserve >= 0, ShapeError, f"reserve={reserve!r} must be an int >= 0")
    if debug_enabled():
        check_agree("prefill", group, why=_WHY, input_ids=input_ids, fingerprint=_fingerprint(input_ids))


def _fingerprint(ids: torch.Tensor) -> tuple[int, int]:
    """Two integers that differ, with near certainty, between different id tensors of one shape."""
    flat = ids.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64)
    return int(flat.sum()), int((flat * weights % 1_000_000_007).sum())


def check_tokens(token_ids, cache: KVCache) -> None:
    """Raise a ShapeError (on every rank alike) unless ``token_ids`` is ``[batch]`` integer ids.

    In debug mode also checks that every rank feeds the same tokens at the same cache length.
    """
    batch = cache.batch
    check(isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1 and token_ids.shape[0] == batch
          and not token_ids.is_floating_point(), ShapeError,
          f"token_ids must be integer ids [batch={batch}], got "
          f"{tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
    if debug_enabled():
        check_agree("decode_step", cache.mesh.sp_group, why=_WHY, token_ids=tuple(token_ids.tolist()),
                    seq_len=cache.seq_len)


def new_cache(info: SeqInfo, mesh: Mesh, batch: int, num_layers: int, reserve: int,
              device: torch.device) -> tuple[KVCache, torch.Tensor | None, int]:
    """This rank's empty cache for a prompt split as ``info`` (its real length is ``info.seq_len``).

    Returns:
        ``(cache, keep, spare)``: ``keep`` indexes the real (non-padding) tokens of this rank's
        shard, None when all are real (padding is never cached); ``spare`` is the room to
        preallocate per layer for this rank's share of ``reserve`` decode tokens (fewest-first
        fills the short shards first).
    No communication: every rank derives every rank's length from ``info``.
    """
    n, rank, s = info.n, group_rank(mesh.sp_group), info.seq_len
    idx = info.indices(rank)  # positions (in the padded prompt) this rank holds; padding sits at >= s
    real = idx < s
    keep = None if bool(real.all()) else real.nonzero().flatten().to(device)
    lengths = [int((info.indices(r) < s).sum()) for r in range(n)]
    cache = KVCache(mesh=mesh, rank=rank, n=n, lengths=lengths, positions=idx[real], prompt_len=s,
                    num_layers=num_layers, batch=batch)
    spare = max(0, -(-(s + reserve) // n) + 1 - lengths[rank]) if reserve else 0
    return cache, keep, spare


def token_owner(info: SeqInfo, token: int) -> tuple[int, int]:
    """``(rank, local index)`` of global (padded) position ``token`` in ``info``'s split.  No communication."""
    for r in range(info.n):
        hit = (info.indices(r) == token).nonzero()
        if hit.numel():
            return r, int(hit[0, 0])
    raise ShapeError(f"position {token} is outside the padded sequence of {info.padded_len} tokens")


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions of the same queries over disjoint key shards held by the ranks of ``group``.

    Args:
        out: ``[B, L, H, D]`` this rank's partial output; lse: ``[B, H, L]`` (``-inf`` where the
            rank's shard holds no visible key, e.g. an empty shard).
    Returns:
        (out ``[B, L, H, D]``, lse ``[B, H, L]``) in float32 (float64 for float64 input), identical
        on every rank (every rank merges the same parts in rank order).
    Communication: one all-gather of ``[B, L, H, D + 1]`` (out with lse appended) per call.
    """
    n = group_size(group)
    acc = accumulation_dtype(out.dtype)
    if n == 1:
        return out.to(acc), lse.to(acc)
    packed = torch.cat([out.to(acc), lse.to(acc).transpose(1, 2).unsqueeze(-1)], dim=-1)  # [B, L, H, D+1]
    parts = comm.all_gather(packed, 0, group).view(n, *packed.shape)  # rank-major
    acc_out = parts[0, ..., :-1].clone()
    acc_lse = parts[0, ..., -1].transpose(1, 2).contiguous()
    for r in range(1, n):
        merge_into(acc_out, acc_lse, parts[r, ..., :-1], parts[r, ..., -1].transpose(1, 2))
    return acc_out, acc_lse


def window_keys(positions: torch.Tensor, query_pos: int, window: int | None) -> torch.Tensor | None:
    """Indices of the cached keys a causal sliding window leaves visible to a query at ``query_pos``.

    HF's convention: key ``j`` is visible iff ``query_pos - window < j <= query_pos``.  Returns None
    when every cached key is visible (no window, or all keys recent enough).  No communication.
    """
    if window is None:
        return None
    seen = positions > query_pos - int(window)
    if bool(seen.all()):
        return None
    return seen.nonzero().flatten()


def decode_attention(layer: LayerCache, own: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *,
                     scale: float | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """One layer of sequence-parallel decode.

    Args:
        layer: this rank's cache of the layer, ``[B, n_local, Hkv, D]``.
        own: this rank stores the new token: it appends ``k, v`` *before* attending, so the
            token attends to itself exactly once over all ranks.
        q: ``[B, 1, H, D]`` the new token's query (replicated); k, v: ``[B, 1, Hkv, D]``.
        scale: softmax scale (None = 1/sqrt(D)).
        keys: indices of the visible cached keys (a sliding window, :func:`window_keys`); None = all.
    Returns:
        ``[B, 1, H, D]`` in q's dtype, the same on every rank.
    Communication: one all-gather over ``group`` of ``[B, 1, H, D+1]`` float32 (independent of the
    cached length); the cache never moves.  No causal mask: every cached token is earlier.
    """
    check(q.shape[1] == 1 and k.shape[1] == 1, ShapeError,
          f"decode attends one new token per sequence, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    layer.check(k, v)  # on every rank: a misfit must not fail on the owner alone, before the all-gather
    if own:
        layer.append(k, v)
    ck, cv = layer.k, layer.v
    if keys is not None:
        ck, cv = ck.index_select(1, keys), cv.index_select(1, keys)
    out, lse = attention_with_lse(q, ck, cv, scale=scale)
    out, _ = merge_over_group(out, lse, group)
    return out.to(q.dtype)
