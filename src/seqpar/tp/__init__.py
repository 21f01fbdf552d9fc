"""Megatron-style tensor parallelism with sequence parallelism (Korthikanti et al. 2022).

Building blocks for a transformer whose hidden/FFN/vocab dims are split over
``mesh.tp_group`` (t ranks)::

    emb  = VocabParallelEmbedding(V, h, sequence_parallel=True)      # ids [B, S]      -> [B, S/t, h]
    norm = RMSNorm(h)                                                # [B, S/t, h], local
    up   = ColumnParallelLinear(h, f, sequence_parallel=True)        # [B, S/t, h]     -> [B, S, f/t]
    down = RowParallelLinear(f, h, sequence_parallel=True)           # [B, S, f/t]     -> [B, S/t, h]
    head = ColumnParallelLinear(h, V, bias=False, sequence_parallel=True)  # -> logits [B, S, V/t]
    loss = vocab_parallel_cross_entropy(logits, target, group=mesh.tp_group, reduction="mean")
    loss.backward(); sync_sequence_parallel_grads(model, mesh); optimizer.step()

``mesh=None`` means :func:`seqpar.get_mesh` (or a single process when there is
none).  Every layer converts to/from its single-device equivalent with
``from_full`` / ``to_full``.  Dropout streams: :func:`model_parallel_seed` and
:func:`get_rng_tracker`.
"""
from ._base import TPModule, skip_init
from .cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .embedding import VocabParallelEmbedding
from .layers import ColumnParallelLinear, RowParallelLinear
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .norm import LayerNorm, RMSNorm, mark_sequence_parallel, sync_sequence_parallel_grads
from .random import TENSOR_PARALLEL_RNG, RNGStatesTracker, get_rng_tracker, model_parallel_seed

__all__ = [
    "TPModule", "skip_init", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_parallel_argmax",
    "LayerNorm", "RMSNorm", "sync_sequence_parallel_grads", "mark_sequence_parallel",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "TENSOR_PARALLEL_RNG",
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region", "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region", "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region", "reduce_scatter_to_sequence_parallel_region",
]
