"""Analytic memory / communication / time planner for sequence parallelism.

Pure Python (no torch, no process groups). Given a model shape
(:mod:`seqpar.configs`), a sequence length and a GPU count, it computes per
GPU:

* activation memory, following Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models"), generalised to
  GQA, SwiGLU, any FFN width, fused attention kernels and the sequence-
  parallel strategies of this package (:mod:`seqpar.plan.memory`);
* parameter, gradient and optimizer memory with ZeRO 0-3
  (:func:`model_state_memory`), and the peak of a training step under the memory settings seqpar
  runs: recomputation, host offload, tiled MLPs, the chunked loss, FSDP2's working set
  (:mod:`seqpar.plan.peak`, :class:`MemorySettings`);
* bytes sent per layer, forward and backward, under standard ring
  collective cost models (:mod:`seqpar.plan.comm_cost`);
* a step-time estimate from FLOPs, peak throughput and NVLink / InfiniBand / PCIe
  bandwidths, with ring transfers overlapped with block compute
  (:mod:`seqpar.plan.timing`);

and :func:`plan` enumerates every layout and the memory settings left open
(:class:`Settings`), drops what does not fit the GPU or the host, and recommends the fastest
(:mod:`seqpar.plan.planner`); :func:`max_seq_len` answers the longest sequence that fits;
:mod:`seqpar.plan.emit` writes the ``seqpar train`` config of a recommendation.  For
long-context inference, :func:`plan_inference` splits the KV cache and the prefill over
``tp x sp`` (:mod:`seqpar.plan.inference`).

Units: bytes (GB = 1e9 bytes), seconds, FLOPs; bandwidths in GB/s.

The module itself is callable, so that ``seqpar.plan(...)`` is the planner
(the API of the design notes) while ``seqpar.plan.activation_memory_per_layer``
and the other functions stay reachable as attributes.

Example::

    >>> import seqpar.plan
    >>> p = seqpar.plan("llama3-8b", seq_len=131072, n_gpus=32)   # == seqpar.plan.plan(...)
    >>> p.recommended.label, p.reason
    >>> print(p.table(limit=10))
"""
import sys as _sys
import types as _types

from seqpar.plan.comm_cost import (
    CommVolume,
    Transfer,
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    comm_volume_per_layer,
    dp_comm_bytes,
    layer_transfers,
    reduce_scatter_bytes,
)
from seqpar.plan.implementation import IMPLEMENTATIONS
from seqpar.plan.inference import InferenceOption, InferencePlan, kv_cache_bytes, plan_inference
from seqpar.plan.memory import (
    GB,
    activation_memory,
    activation_memory_per_layer,
    activation_terms_per_layer,
    hidden_state_bytes,
    model_state_memory,
    non_layer_activation_terms,
    parameter_count,
)
from seqpar.plan.parallel_layout import (
    ATTENTION_KERNELS,
    RECOMPUTE_MODES,
    SP_STRATEGIES,
    STRATEGIES,
    ParallelLayout,
    group_spans_nodes,
    resolve_parallel_layout,
)
from seqpar.plan.peak import MemoryBreakdown, MemorySettings, peak_memory
from seqpar.plan.planner import Candidate, MaxLength, NothingFits, Plan, Settings, evaluate, max_seq_len, plan
from seqpar.plan.timing import Hardware, TimeEstimate, estimate_layout_time, layer_flops

__all__ = [
    "ATTENTION_KERNELS", "IMPLEMENTATIONS", "RECOMPUTE_MODES", "SP_STRATEGIES", "STRATEGIES", "GB",
    "ParallelLayout", "resolve_parallel_layout", "group_spans_nodes",
    "hidden_state_bytes", "activation_terms_per_layer", "activation_memory_per_layer",
    "non_layer_activation_terms", "activation_memory", "parameter_count", "model_state_memory",
    "MemoryBreakdown", "MemorySettings", "peak_memory",
    "Transfer", "CommVolume", "comm_volume_per_layer", "layer_transfers", "dp_comm_bytes",
    "all_gather_bytes", "reduce_scatter_bytes", "all_reduce_bytes", "all_to_all_bytes",
    "Hardware", "TimeEstimate", "layer_flops", "estimate_layout_time",
    "Candidate", "Plan", "Settings", "NothingFits", "MaxLength", "evaluate", "plan", "max_seq_len",
    "kv_cache_bytes", "InferenceOption", "InferencePlan", "plan_inference",
]


class _CallableModule(_types.ModuleType):
    """This package's module type: calling the module calls :func:`plan`."""

    def __call__(self, model, seq_len, n_gpus, **kwargs) -> Plan:
        """``seqpar.plan(model, seq_len, n_gpus, ...)``: see :func:`seqpar.plan.plan`."""
        return plan(model, seq_len, n_gpus, **kwargs)


# Swapping the class keeps this very module object (and everything already imported from it):
# no proxy in sys.modules, and `import seqpar.plan` / `from seqpar.plan import x` behave as usual.
_sys.modules[__name__].__class__ = _CallableModule
