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


@pytest.mark.parametrize("case", ["1 GPU", "ring sp=2 tp=2", "ulysses sp=2"])
def test_saved_bytes_of_every_memory_setting_to_the_byte(pool, case):
    """Recompute (selective, full, chains), tiled MLP and the chunked loss: the planner's stored bytes are
    what the model saves (float32 on CPU), to the byte."""
    rows = pv.setting_rows([512], list(pv.MEMORY_SETTINGS), [case],
                           lambda world, fn, *args: pool(world).run(fn, *args))
    for r in rows:
        assert r["measured"] == r["predicted"], r


def test_peak_of_a_training_step_within_5_percent_and_its_slope_within_2(pool):
    """The planner's device peak against the CPU allocator's own count over one training step (4 ranks,
    ring sp=4, float32; benchmarks/memory_peak.py), at two lengths: the peak within 5%, the bytes per extra
    token within 2%, each setting on and off."""
    from benchmarks import memory_peak as mp

    settings = ["plain", "full+offload", "loss chunks 1024", "full, tiles, chunks"]
    rows = mp.rows([2048, 4096], settings, lambda world, fn, *args: pool(world).run(fn, *args, timeout=300))
    by = {(r["setting"], r["seq_len"]): r for r in rows}
    for name in settings:
        a, b = by[(name, 2048)], by[(name, 4096)]
        for r in (a, b):
            assert r["measured"] == pytest.approx(r["predicted"], rel=0.05), r
        slope_m = (b["measured"] - a["measured"]) / 2048
        slope_p = (b["predicted"] - a["predicted"]) / 2048
        assert slope_m == pytest.approx(slope_p, rel=0.02), (name, slope_m, slope_p)
