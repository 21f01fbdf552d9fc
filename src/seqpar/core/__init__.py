"""The substrate every other layer is built on; nothing here imports from above it.

* :mod:`~seqpar.core.errors`: the exceptions seqpar raises on purpose.
* :mod:`~seqpar.core.mesh`: dp x sp (ulysses x ring) x tp process groups, the default mesh.
* :mod:`~seqpar.core.comm`: differentiable collectives (each backward the dual of its forward) and the ring exchange.
* :mod:`~seqpar.core.kernels`: local attention returning its log-sum-exp on every backend; the float32 merge.
* :mod:`~seqpar.core.masks`, :mod:`~seqpar.core.packing`: masks from token metadata; packed and padded sequences.
* :mod:`~seqpar.core.layout`: which tokens a rank holds; ``shard`` / ``unshard`` / ``position_ids``.
* :mod:`~seqpar.core.stats`, :mod:`~seqpar.core.debug`: counters; opt-in cross-rank and finite checks.
* :mod:`~seqpar.core.configs`: transformer shapes shared by the models and the planner.
* :mod:`~seqpar.core.recompute`: activation checkpointing (host offload of checkpoints), tiled token-wise blocks.

The short public names (``seqpar.comm``, ``seqpar.kernels``, ``seqpar.stats``, ``seqpar.layout``...)
refer to these modules.
"""
