"""The planner's ``implementation="seqpar"`` accounting against the model's real saved activations (CPU).

One decoder layer of :class:`seqpar.models.LlamaForCausalLM` and the whole model
(forward + loss), float32, measured with ``saved_activations(exclude=params)`` on
local ranks, must be within 10% of :func:`seqpar.plan.activation_memory_per_layer`
/ :func:`seqpar.plan.activation_memory` at two sequence lengths. (On CPU they agree
to the byte; ``benchmarks/PLAN_VALIDATION.md`` has the full table.)
"""
from __future__ import annotations

import pytest

from benchmarks import plan_validation as pv
from seqpar.plan import activation_memory_per_layer

SEQ_LENS = (512, 2048)


@pytest.mark.parametrize("case", ["1 GPU", "tp=2 +SP", "ring sp=2", "ulysses sp=2", "ring sp=2 tp=2"])
def test_predicted_activation_memory_within_10_percent(pool, case):
    rows = pv.rows(SEQ_LENS, "float32", "cpu", [case], lambda world, fn, *args: pool(world).run(fn, *args))
    for r in rows:
        assert r["layer_saved"] == pytest.approx(r["pred_layer"], rel=0.10), r
        assert r["model_saved"] == pytest.approx(r["pred_model"], rel=0.10), r


def test_seqpar_accounting_is_linear_in_s_and_divided_by_parallelism():
    """No S^2 term with the fused kernels; tp+SP and sp each divide everything but RoPE's tables (not by tp)."""
    cfg = pv.CONFIG
    one = activation_memory_per_layer(cfg, 1024, 1, recompute="none", dtype_bytes=4, implementation="seqpar")
    two = activation_memory_per_layer(cfg, 2048, 1, recompute="none", dtype_bytes=4, implementation="seqpar")
    assert two == 2 * one
    ring = activation_memory_per_layer(cfg, 2048, 1, recompute="none", dtype_bytes=4, sp=2, strategy="ring",
                                       implementation="seqpar")
    assert ring == one
    tp = activation_memory_per_layer(cfg, 2048, 1, tp=2, sequence_parallel=True, recompute="none", dtype_bytes=4,
                                     strategy="megatron", implementation="seqpar")
    rope = 16 * 2048 * cfg.d
    assert tp - rope == (two - rope) // 2


def test_paper_mode_stays_the_default():
    cfg = pv.CONFIG
    assert activation_memory_per_layer(cfg, 512, 1) == activation_memory_per_layer(cfg, 512, 1,
                                                                                    implementation="paper")
    assert activation_memory_per_layer(cfg, 512, 1) != activation_memory_per_layer(cfg, 512, 1,
                                                                                    implementation="seqpar")
