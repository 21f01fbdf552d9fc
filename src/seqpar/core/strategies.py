"""Names of the sequence-parallel attention strategies, defined once (no torch: the planner reads them too).

:mod:`seqpar.attention` implements each one; :mod:`seqpar.plan` costs each one (plus ``none`` and
Megatron's ``megatron``, which are not attention strategies); the command line offers them.
"""
from __future__ import annotations

__all__ = ["SP_STRATEGIES"]

#: ring: K/V passed around a ring; ulysses: all-to-all to a head split; allgather: gather K/V;
#: usp: ulysses x ring (2-D); ring_qk_av: ColossalAI's RingQK/RingAV (scores materialised)
SP_STRATEGIES: tuple[str, ...] = ("ring", "ulysses", "allgather", "usp", "ring_qk_av")
