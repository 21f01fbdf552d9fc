"""Every strategy x layout x mask x GQA x dtype equals single-device SDPA, forward and gradients."""
from __future__ import annotations

import pytest
import torch

from tests.attention.cases import assemble, run_attention
from tests.helpers import max_err, qkv, sdpa_reference

STRATEGIES = ["ring", "allgather", "ulysses", "ring_qk_av"]
LAYOUTS = ["contiguous", "zigzag", "stripe"]
KEYS = ["out", "dq", "dk", "dv"]

# (B, S, H, Hkv, D): MHA, GQA 4:2 and MQA 4:1 (ulysses repeats the single kv head over ranks)
SHAPES = {"mha": (2, 32, 4, 4, 16), "gqa": (1, 32, 4, 2, 16), "mqa": (1, 32, 4, 1, 16)}


def _errors(results, shape, causal, ref_dtype=torch.float64):
    q, k, v, do = qkv(shape, 0)
    ref = sdpa_reference(q, k, v, do, causal, dtype=ref_dtype)
    return {key: max_err(assemble(results, key, shape[1]), r) for key, r in zip(KEYS, ref)}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(SHAPES))
def test_float32_matches_sdpa(pool, world, strategy, layout, causal, heads):
    shape = SHAPES[heads]
    results = pool(world).run(run_attention, strategy, layout, causal, "float32", shape)
    errs = _errors(results, shape, causal)
    assert max(errs.values()) < 2e-5, errs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bfloat16_no_looser_than_single_device(pool, world, strategy, causal):
    """bf16 error against float64 is within 1.5x of the single-device bf16 kernel's own error."""
    shape = (1, 64, 4, 2, 32)
    results = pool(world).run(run_attention, strategy, "zigzag", causal, "bfloat16", shape)
    errs = _errors(results, shape, causal)
    q, k, v, do = qkv(shape, 0)
    single = sdpa_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), do.bfloat16(), causal, dtype=torch.bfloat16)
    exact = sdpa_reference(q, k, v, do, causal)
    for key, s, e in zip(KEYS, single, exact):
        budget = max_err(s, e)
        assert errs[key] <= 1.5 * budget, (key, errs[key], budget)


@pytest.mark.parametrize("transport", ["p2p", "alltoall"])
@pytest.mark.parametrize("strategy", ["ring", "ring_qk_av"])
def test_ring_transports_agree(pool, transport, strategy):
    shape = SHAPES["gqa"]
    results = pool(4).run(run_attention, strategy, "zigzag", True, "float32", shape, transport=transport)
    assert max(_errors(results, shape, True).values()) < 2e-5


def test_world_8(pool):
    shape = (1, 64, 8, 2, 16)
    for strategy in STRATEGIES:
        for causal in (False, True):
            results = pool(8).run(run_attention, strategy, "zigzag", causal, "float32", shape)
            errs = _errors(results, shape, causal)
            assert max(errs.values()) < 2e-5, (strategy, causal, errs)
