"""Tests of seqpar.plan: memory / communication / time model and the recommender.

Paper numbers: Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", section 4 and Table 2, with GPT-3 175B
(h=12288, a=96, 96 layers, fp16/bf16, dropout on).
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpar.core.configs import ModelConfig, get_config
from seqpar.core.errors import ConfigError
from seqpar.plan import (
    activation_memory,
    activation_memory_per_layer,
    activation_terms_per_layer,
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    comm_volume_per_layer,
    dp_comm_bytes,
    evaluate,
    group_spans_nodes,
    hidden_state_bytes,
    layer_flops,
    model_state_memory,
    non_layer_activation_terms,
    parameter_count,
    plan,
    reduce_scatter_bytes,
)

GPT3 = "gpt3-175b"
H, A, L = 12288, 96, 96

# A GPT-3-like model small enough for plan() to be fast, with GQA variants.
SMALL = dict(hidden_size=1024, num_attention_heads=16, num_layers=4, ffn_hidden_size=4096, vocab_size=32000)
HEADS6 = {"hidden_size": 96, "num_attention_heads": 6, "num_hidden_layers": 2, "intermediate_size": 256,
          "vocab_size": 100}


def sbh(s: int, b: int, h: int = H) -> int:
    return s * b * h


# --------------------------------------------------------------------------
# Worked numbers of the design notes
# --------------------------------------------------------------------------

def test_gpt3_hidden_state_worked_example():
    # b=32, s=2048, h=12288, bf16: one [b, s, h] tensor is 1.61 GB per layer ...
    full = hidden_state_bytes(GPT3, 2048, 32)
    assert full == 2 * 32 * 2048 * 12288 == 1_610_612_736
    assert round(full / 1e9, 2) == 1.61
    # ... 0.20 GB with 8-way sequence parallelism, 87.5 % saved
    shard = hidden_state_bytes(GPT3, 2048, 32, sp=8)
    assert shard == full // 8 == 201_326_592
    assert round(shard / 1e9, 2) == 0.20
    assert 1 - shard / full == 0.875
    # full recomputation keeps exactly that layer input
    assert activation_memory_per_layer(GPT3, 2048, 32, recompute="full") == full
    assert activation_memory_per_layer(GPT3, 2048, 32, recompute="full", sp=8, strategy="ulysses") == shard
    assert activation_memory_per_layer(GPT3, 2048, 32, tp=8, sequence_parallel=True, recompute="full") == shard


# --------------------------------------------------------------------------
# Korthikanti et al. per-layer formulas, exact integers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("s, b", [(2048, 1), (2048, 4), (4096, 1)])
def test_paper_no_parallelism(s, b):
    # s*b*h*(34 + 5*a*s/h) = 34 sbh + 5 a s^2 b
    assert activation_memory_per_layer(GPT3, s, b) == 34 * sbh(s, b) + 5 * A * s * s * b


def test_paper_gpt3_s2048_b1_numbers():
    s, b, t = 2048, 1, 8
    # hand computation: sbh = 25,165,824; 5as^2b = 2,013,265,920
    assert sbh(s, b) == 25_165_824 and 5 * A * s * s * b == 2_013_265_920
    assert activation_memory_per_layer(GPT3, s, b) == 34 * 25_165_824 + 2_013_265_920 == 2_868_903_936
    # TP t=8: sbh(10 + 24/t + 5as/(ht)) = 251,658,240 + 75,497,472 + 251,658,240
    assert activation_memory_per_layer(GPT3, s, b, tp=t) == 578_813_952
    # TP+SP t=8: sbh(34 + 5as/h)/t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True) == 2_868_903_936 // 8 == 358_612_992
    # TP+SP+selective: 34 sbh / t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True,
                                       recompute="selective") == 34 * 25_165_824 // 8 == 106_954_752
    # TP+selective (no SP): sbh(10 + 24/t)
    assert activation_memory_per_layer(GPT3, s, b, tp=t, recompute="selective") == 10 * 25_165_824 + 3 * 25_165_824
    # full: 2 sbh, /t with SP
    assert activation_memory_per_layer(GPT3, s, b, tp=t, recompute="full") == 2 * 25_165_824
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True, recompute="full") == 6_291_456


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_paper_tensor_parallel(t):
    s, b = 2048, 2
    x = sbh(s, b)
    assert activation_memory_per_layer(GPT3, s, b, tp=t) == 10 * x + 24 * x // t + 5 * A * s * s * b // t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True) == (34 * x + 5 * A * s * s * b) // t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, recompute="selective") == 10 * x + 24 * x // t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True, recompute="selective") == 34 * x // t
    assert activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True, recompute="full") == 2 * x // t


def test_paper_table2_total_activation_gpt3():
    # whole model, TP+SP+selective, t=8: L * 34 sbh / t plus the section 4.3 terms
    s, b, t, v = 2048, 1, 8, 50257
    x = sbh(s, b)
    extra = non_layer_activation_terms(GPT3, s, b, tp=t, sequence_parallel=True)
    assert extra == {"embedding_dropout_mask": x // t, "final_norm_input": 2 * x // t, "output_input": 2 * x // t,
                     "logits_fp32": 4 * s * b * math.ceil(v / t)}
    total = activation_memory(GPT3, s, b, tp=t, sequence_parallel=True, recompute="selective")
    assert total == L * 34 * x // t + sum(extra.values())


@settings(max_examples=40, deadline=None)
@given(t=st.sampled_from([1, 2, 4, 8]), s_mult=st.integers(1, 8), b=st.integers(1, 4),
       recompute=st.sampled_from(["none", "selective", "full"]), kernel=st.sampled_from(["math", "flash"]))
def test_sequence_parallel_divides_by_exactly_t(t, s_mult, b, recompute, kernel):
    s = 256 * s_mult
    base = activation_memory_per_layer(GPT3, s, b, recompute=recompute, attention_kernel=kernel)
    sp = activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True, recompute=recompute,
                                     attention_kernel=kernel)
    assert sp * t == base


def test_ulysses_matches_tp_sp_without_gqa():
    # Ulysses over n GPUs stores what Megatron TP+SP over n GPUs stores (a/n heads, s/n tokens)
    for n in (2, 4, 8):
        assert activation_memory_per_layer(GPT3, 4096, 1, sp=n, strategy="ulysses") == \
            activation_memory_per_layer(GPT3, 4096, 1, tp=n, sequence_parallel=True)


@pytest.mark.parametrize("model", [GPT3, "llama3-8b", "tiny"])
@pytest.mark.parametrize("layout", [dict(), dict(tp=4, sequence_parallel=True), dict(sp=4, strategy="ring"),
                                    dict(sp=2, strategy="ulysses"), dict(sp=4, strategy="allgather"),
                                    dict(sp=4, strategy="usp", ulysses=2), dict(sp=4, strategy="ring_qk_av")])
def test_recompute_ordering(model, layout):
    none = activation_memory_per_layer(model, 4096, 1, recompute="none", **layout)
    sel = activation_memory_per_layer(model, 4096, 1, recompute="selective", **layout)
    full = activation_memory_per_layer(model, 4096, 1, recompute="full", **layout)
    assert full < sel < none


# --------------------------------------------------------------------------
# Generalisations: dtype, GQA, SwiGLU, flash, sequence-parallel strategies
# --------------------------------------------------------------------------

def test_term_breakdown_matches_paper_rows():
    s, b = 2048, 1
    x = sbh(s, b)
    t = activation_terms_per_layer(GPT3, s, b)
    assert t["norm_inputs"] == 4 * x and t["qkv_input"] == 2 * x and t["mlp_input"] == 2 * x
    assert t["dropout_masks"] == 2 * x and t["q"] + t["k"] + t["v"] == 6 * x and t["attn_output"] == 2 * x
    assert t["mlp_hidden"] == 16 * x and t["scores"] == 5 * A * s * s * b


def test_swiglu_gqa_generalisation():
    c = get_config("llama3-8b")  # swiglu, f=14336, kv=8, no dropout
    s, b, p = 4096, 1, 2
    t = activation_terms_per_layer(c, s, b)
    assert t["k"] == t["v"] == p * s * b * 8 * 128
    assert t["q"] == p * s * b * 4096
    assert t["mlp_hidden"] == 3 * p * s * b * 14336
    assert t["dropout_masks"] == 0
    assert t["scores"] == p * 32 * s * s * b  # softmax output only, no dropout
    # dropout on: masks 1 byte/elt, scores (2p+1)
    t2 = activation_terms_per_layer(c, s, b, dropout=True)
    assert t2["dropout_masks"] == 2 * s * b * 4096 and t2["scores"] == 5 * 32 * s * s * b


def test_dtype_bytes_scales_everything_but_masks():
    s, b = 1024, 1
    t2 = activation_terms_per_layer(GPT3, s, b, dtype_bytes=2)
    t4 = activation_terms_per_layer(GPT3, s, b, dtype_bytes=4)
    for k in t2:
        if k == "dropout_masks":
            assert t4[k] == t2[k]
        elif k == "scores":
            assert t4[k] == 9 * A * s * s * b  # (2p+1) with p=4
        else:
            assert t4[k] == 2 * t2[k]


def test_flash_drops_score_term():
    s, b, t = 2048, 1, 8
    math_ = activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True)
    flash = activation_memory_per_layer(GPT3, s, b, tp=t, sequence_parallel=True, attention_kernel="flash")
    lse = 4 * b * (A // t) * s  # fp32 log-sum-exp per head and query row
    assert flash == math_ - 5 * A * s * s * b // t + lse
    assert flash == 34 * sbh(s, b) // t + lse


def test_strategy_specific_attention_storage():
    s, b, n = 4096, 1, 4
    kv_dim, p = 8 * 128, 2
    ring = activation_terms_per_layer("llama3-8b", s, b, sp=n, strategy="ring", attention_kernel="flash")
    ag = activation_terms_per_layer("llama3-8b", s, b, sp=n, strategy="allgather", attention_kernel="flash")
    # all-gather keeps full K and V
    assert ag["k"] == ag["v"] == p * s * b * kv_dim
    assert ring["k"] == ring["v"] == p * (s // n) * b * kv_dim
    # ring_qk_av materialises [b, a, s/sp, s] scores whatever the kernel
    qkav = activation_terms_per_layer(GPT3, s, b, sp=n, strategy="ring_qk_av", attention_kernel="flash")
    assert qkav["scores"] == 5 * b * A * (s // n) * s
    # ulysses: [b, a/u, s, s] scores
    uly = activation_terms_per_layer(GPT3, s, b, sp=n, strategy="ulysses")
    assert uly["scores"] == 5 * b * (A // n) * s * s
    # usp u x r: [b, a/u, s/r, s]
    usp = activation_terms_per_layer(GPT3, s, b, sp=8, strategy="usp", ulysses=4)
    assert usp["scores"] == 5 * b * (A // 4) * (s // 2) * s
    # everything else divides s by sp
    for k in ("norm_inputs", "qkv_input", "q", "attn_output", "mlp_hidden"):
        assert ring[k] * n == activation_terms_per_layer("llama3-8b", s, b, attention_kernel="flash")[k]


def test_ulysses_kv_replication_when_kv_lt_u():
    # llama3-8b: 8 kv heads; u=16 gives each rank one replicated kv head over all s tokens
    s = 16384
    t = activation_terms_per_layer("llama3-8b", s, 1, sp=16, strategy="ulysses", attention_kernel="flash")
    assert t["k"] == 2 * s * 1 * 128


def test_ulysses_infeasible_when_heads_not_divisible():
    c = evaluate(HEADS6, 1024, strategy="ulysses", sp=4)
    assert not c.feasible and not c.fits
    assert "heads" in c.reason and "6" in c.reason
    with pytest.raises(ConfigError, match="num_attention_heads"):
        activation_memory_per_layer(HEADS6, 1024, 1, sp=4, strategy="ulysses")
    # ring has no head constraint
    assert evaluate(HEADS6, 1024, strategy="ring", sp=4).feasible


def test_layout_errors():
    with pytest.raises(ConfigError, match="strategy"):
        activation_memory_per_layer(GPT3, 2048, 1, sp=4)
    with pytest.raises(ConfigError, match="seq_len"):
        activation_memory_per_layer(GPT3, 2050, 1, sp=4, strategy="ring")
    with pytest.raises(ConfigError, match="ulysses"):
        activation_memory_per_layer(GPT3, 2048, 1, sp=4, strategy="usp")
    with pytest.raises(ConfigError, match="recompute"):
        activation_memory_per_layer(GPT3, 2048, 1, recompute="some")
    with pytest.raises(ConfigError, match="unknown strategy"):
        activation_memory_per_layer(GPT3, 2048, 1, sp=2, strategy="zigzag")


# --------------------------------------------------------------------------
# Parameters, optimizer, ZeRO
# --------------------------------------------------------------------------

def test_parameter_counts_match_published():
    assert parameter_count(GPT3) == pytest.approx(174.6e9, rel=1e-3)
    assert parameter_count("llama3-8b") == pytest.approx(8.03e9, rel=1e-3)
    assert parameter_count("llama3-70b") == pytest.approx(70.55e9, rel=1e-3)
    assert parameter_count("llama3-405b") == pytest.approx(405.85e9, rel=1e-3)
    assert parameter_count("mistral-7b") == pytest.approx(7.24e9, rel=1e-3)
    assert parameter_count("qwen2-7b") == pytest.approx(7.62e9, rel=2e-3)
    assert parameter_count("llama3-8b", tp=8) < parameter_count("llama3-8b") / 7.9


def test_model_state_zero_stages():
    n = parameter_count("llama3-8b")
    z0 = model_state_memory("llama3-8b", zero_stage=0)
    assert sum(z0.values()) == 16 * n  # mixed-precision Adam
    z = {k: model_state_memory("llama3-8b", dp=4, sp=2, zero_stage=k) for k in range(4)}
    g = 8
    assert z[1] == {"parameters": 2 * n, "gradients": 2 * n, "optimizer": -(-12 * n // g)}
    assert z[2] == {"parameters": 2 * n, "gradients": -(-2 * n // g), "optimizer": -(-12 * n // g)}
    assert z[3] == {"parameters": -(-2 * n // g), "gradients": -(-2 * n // g), "optimizer": -(-12 * n // g)}
    fp32_grads = model_state_memory("llama3-8b", grad_bytes=4, optimizer_bytes=12)
    assert sum(fp32_grads.values()) == 18 * n


# --------------------------------------------------------------------------
# Communication volume
# --------------------------------------------------------------------------

def test_collective_cost_models():
    assert all_gather_bytes(800, 8) == reduce_scatter_bytes(800, 8) == 700
    assert all_reduce_bytes(800, 8) == 1400
    assert all_to_all_bytes(800, 8) == 700
    assert all_gather_bytes(800, 1) == 0


def test_comm_none_is_zero():
    v = comm_volume_per_layer(GPT3, 2048, 1)
    assert v.forward == v.backward == 0


def test_comm_megatron():
    s, b, t, p = 2048, 1, 8, 2
    x = p * s * b * H
    v = comm_volume_per_layer(GPT3, s, b, strategy="megatron", tp=t)
    assert v.forward == 4 * (t - 1) * x // t  # 2 all-gathers + 2 reduce-scatters of [s, b, h]
    # backward: 2 RS + 2 AG (conjugates) + 2 AG re-gathering the sequence-sharded input for wgrad
    assert v.backward == 6 * (t - 1) * x // t
    plain = comm_volume_per_layer(GPT3, s, b, strategy="megatron", tp=t, sequence_parallel=False)
    assert plain.forward == plain.backward == 2 * 2 * (t - 1) * x // t  # 2 all-reduces each way


def test_comm_ulysses_gqa():
    c = get_config("llama3-8b")
    s, b, u, p = 8192, 1, 8, 2
    q = p * b * (s // u) * c.q_dim
    kv = p * b * (s // u) * c.kv_dim
    v = comm_volume_per_layer(c, s, b, strategy="ulysses", sp=u)
    assert v.forward == (u - 1) * (q + kv + kv + q) // u
    assert v.backward == v.forward
    assert len([x for x in v.transfers if x.phase == "forward"]) == 4


def test_comm_ring():
    c = get_config("llama3-8b")
    s, b, r, p = 8192, 1, 8, 2
    blk = p * b * (s // r) * c.kv_dim
    v = comm_volume_per_layer(c, s, b, strategy="ring", sp=r)
    assert v.forward == (r - 1) * 2 * blk
    assert v.backward == (r - 1) * 2 * blk + r * 2 * blk  # K/V again, dK/dV full circle
    q = comm_volume_per_layer(c, s, b, strategy="ring_qk_av", sp=r)
    assert q.forward == v.forward and q.backward == v.backward


def test_ring_gqa_is_heads_over_kv_times_smaller():
    mha = ModelConfig(**SMALL)
    for kv in (1, 2, 4, 8):
        gqa = ModelConfig(**SMALL, num_key_value_heads=kv)
        for strategy in ("ring", "ring_qk_av", "allgather"):
            a = comm_volume_per_layer(mha, 8192, 1, strategy=strategy, sp=8)
            g = comm_volume_per_layer(gqa, 8192, 1, strategy=strategy, sp=8)
            assert a.forward == g.forward * (16 // kv)
            assert a.backward == g.backward * (16 // kv)


def test_comm_allgather_and_usp():
    c = get_config("llama3-8b")
    s, b, p = 8192, 1, 2
    full_kv = p * b * s * c.kv_dim
    ag = comm_volume_per_layer(c, s, b, strategy="allgather", sp=4)
    assert ag.forward == ag.backward == 2 * 3 * full_kv // 4
    # usp = ulysses part over u on s/sp tokens + ring part over r with [b, s/r, kv/u, d] blocks
    u, r = 4, 2
    usp = comm_volume_per_layer(c, s, b, strategy="usp", sp=u * r, ulysses=u)
    q = p * b * (s // 8) * c.q_dim
    kvl = p * b * (s // 8) * c.kv_dim
    blk = p * b * (s // r) * (c.kv_heads // u) * c.d
    assert usp.forward == (u - 1) * (2 * q + 2 * kvl) // u + (r - 1) * 2 * blk
    assert usp.by_group() == {"ulysses": 2 * (u - 1) * (2 * q + 2 * kvl) // u,
                              "ring": (r - 1) * 2 * blk * 2 + r * 2 * blk}


def test_full_recompute_replays_forward_comm():
    base = comm_volume_per_layer("llama3-8b", 8192, 1, strategy="ulysses", sp=8)
    full = comm_volume_per_layer("llama3-8b", 8192, 1, strategy="ulysses", sp=8, recompute="full")
    assert full.forward == base.forward and full.backward == base.backward + base.forward


def test_dp_comm():
    n = parameter_count("tiny")
    assert dp_comm_bytes("tiny", dp=1) == 0
    assert dp_comm_bytes("tiny", dp=4, zero_stage=0) == 2 * -(-3 * n * 2 // 4)
    assert dp_comm_bytes("tiny", dp=4, zero_stage=3) > dp_comm_bytes("tiny", dp=4, zero_stage=1)


# --------------------------------------------------------------------------
# Time model
# --------------------------------------------------------------------------

def test_flops_match_narayanan_for_gpt3():
    f = layer_flops(get_config(GPT3), 2048, 1, causal=False)
    assert f["matmul"] == 24 * 2048 * H * H
    assert f["attention"] == 4 * 2048 * 2048 * H
    assert layer_flops(get_config(GPT3), 2048, 1, causal=True)["attention"] == f["attention"] / 2


def test_group_spans_nodes():
    assert not group_spans_nodes(1, 8, 8)
    assert group_spans_nodes(1, 16, 8)
    assert group_spans_nodes(4, 4, 8)
    assert not group_spans_nodes(2, 4, 8)
    assert not group_spans_nodes(8, 1, 8)


def test_ring_overlap_hides_transfer_with_fast_links():
    kw = dict(strategy="ring", sp=8, recompute="none", attention_kernel="flash")
    fast = evaluate("llama3-8b", 131072, nvlink_gbps=1e6, ib_gbps=1e6, **kw)
    assert fast.time.comm_forward == pytest.approx(0.0, abs=1e-12)
    # slow links: forward ring time is (r-1) * transfer + last block compute
    slow = evaluate("llama3-8b", 131072, nvlink_gbps=1e-3, ib_gbps=1e-3, **kw)
    blk = 2 * (131072 // 8) * 8 * 128
    x = 2 * blk / 1e6  # K and V block at 1e-3 GB/s
    c = slow.time.compute_forward
    attn_block = layer_flops(get_config("llama3-8b"), 131072)["attention"] / 8 / 8 / (989e12 * 0.5)
    assert slow.time.layer_forward == pytest.approx(c - attn_block * 8 + 7 * x + attn_block, rel=1e-9)


def test_ulysses_comm_is_added():
    kw = dict(strategy="ulysses", sp=8, recompute="none")
    e = evaluate("llama3-8b", 65536, **kw)
    v = comm_volume_per_layer("llama3-8b", 65536, 1, strategy="ulysses", sp=8)
    assert e.time.comm_forward == pytest.approx(v.forward / 450e9)
    assert e.time.layer_forward == pytest.approx(e.time.compute_forward + v.forward / 450e9)
    # 16 GPUs: the all-to-all crosses nodes and runs at the IB bandwidth
    e16 = evaluate("llama3-8b", 65536, strategy="ulysses", sp=16, recompute="none")
    v16 = comm_volume_per_layer("llama3-8b", 65536, 1, strategy="ulysses", sp=16)
    assert e16.time.comm_forward == pytest.approx(v16.forward / 50e9)


# --------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------

def test_plan_recommends_fastest_fitting():
    p = plan("llama3-8b", 131072, 32)
    best = p.recommended
    assert best.fits and best.feasible
    assert best.memory.total <= 80e9
    fitting = [c for c in p.candidates if c.fits]
    assert best.time.tokens_per_s == max(c.time.tokens_per_s for c in fitting)
    assert all(c.tp * c.sp * c.dp == 32 for c in p.candidates)
    assert best.label in p.reason and "\n" not in p.reason
    # the full sequence on every GPU does not fit
    nones = [c for c in p.candidates if c.strategy == "none"]
    assert nones and not nones[0].fits


def test_plan_enumerates_usp_splits_and_tp_divisors():
    p = plan("llama3-8b", 65536, 16)
    usp = {(c.tp, c.ulysses, c.ring) for c in p.candidates if c.strategy == "usp" and c.dp == 1}
    assert {(1, 2, 8), (1, 4, 4), (1, 8, 2), (2, 2, 4), (2, 4, 2)} <= usp
    assert {c.tp for c in p.candidates} == {1, 2, 4, 8}
    small = plan("tiny", 1024, 8)  # 4 heads: tp stops at 4
    assert max(c.tp for c in small.candidates) == 4


def test_plan_reports_ulysses_infeasible_with_heads():
    p = plan(HEADS6, 4096, 4)
    bad = [c for c in p.candidates if c.strategy == "ulysses" and c.sp == 4]
    assert bad and not bad[0].feasible and "heads" in bad[0].reason
    assert p.recommended.fits


def test_plan_refuses_when_nothing_fits():
    fixed = dict(recompute="selective", zero_stage=1)  # with the memory settings fixed, 70B on one GPU cannot fit
    with pytest.raises(ConfigError) as e:
        plan("llama3-70b", 8192, 1, **fixed)
    msg = str(e.value)
    assert "nothing fits" in msg and "80 GB" in msg
    # names the smallest memory needed, and the fixed settings that keep the planner from saving more
    need = evaluate("llama3-70b", 8192, **fixed).memory.total_gb
    assert f"{need:.1f} GB" in msg and "recompute=None (searched, not 'selective')" in msg
    # searched, they fit: the weights' state goes to host memory
    best = plan("llama3-70b", 8192, 1).recommended
    assert best.fits and best.settings.zero_stage >= 2 and best.settings.offload_optimizer


def test_plan_with_fixed_degrees_and_strategies():
    p = plan("llama3-8b", 65536, 16, tp=2, dp=1, strategies=["ring", "usp"])
    assert all(c.tp == 2 and c.dp == 1 and c.strategy in ("ring", "usp") for c in p.candidates)
    with pytest.raises(ConfigError):
        plan("llama3-8b", 65536, 16, tp=3)
    with pytest.raises(ConfigError, match="unknown strategy"):
        plan("llama3-8b", 65536, 16, strategies=["zigzag"])


def test_plan_to_dict_and_table():
    p = plan("tiny", 2048, 8)
    d = p.to_dict()
    s = json.dumps(d)
    back = json.loads(s)
    assert back["recommended"]["label"] == p.recommended.label
    assert len(back["candidates"]) == len(p.candidates)
    tbl = p.table()
    assert p.recommended.label in tbl and "tok/s" in tbl
    assert tbl.count("\n") >= len(p.candidates)


def test_plan_accepts_mapping_and_config():
    m = {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 4, "intermediate_size": 4096,
         "vocab_size": 32000}
    a = plan(m, 8192, 8)
    b = plan(ModelConfig.from_mapping(m), 8192, 8)
    assert a.recommended.label == b.recommended.label
