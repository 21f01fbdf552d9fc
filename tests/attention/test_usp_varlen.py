"""usp (ulysses x ring), uneven heads, packed documents, any length (padding) and sliding windows."""
from __future__ import annotations

import pytest
import torch

from tests.attention.cases import run_sharded
from tests.helpers import masked_reference, max_err, qkv

KEYS = ["out", "dq", "dk", "dv"]
STRATEGIES = ["ring", "allgather", "ulysses", "usp", "ring_qk_av"]


def _check(res, shape, causal, tol=2e-5, **mask):
    q, k, v, do = qkv(shape, 0)
    ref = masked_reference(q, k, v, do, causal=causal, **mask)
    errs = {key: max_err(res[0][key], r) for key, r in zip(KEYS, ref)}
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("world,ulysses", [(4, 2), (8, 2), (8, 4)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_usp_matches_sdpa(pool, world, ulysses, causal, layout):
    shape = (1, 64, 8, 4, 8)
    degrees = {"ulysses": ulysses, "ring": world // ulysses}
    res = pool(world).run(run_sharded, "usp", layout, causal, shape, degrees=degrees)
    _check(res, shape, causal)


def test_usp_zigzag_balances_the_ring_stage(pool):
    res = pool(8).run(run_sharded, "usp", "zigzag", True, (1, 128, 8, 4, 8), degrees={"ulysses": 2, "ring": 4})
    assert len({r["pairs"] for r in res}) == 1, [r["pairs"] for r in res]


@pytest.mark.parametrize("world", [2, 4])
def test_usp_degenerates_to_pure_strategies(pool, world):
    shape = (1, 32, 4, 2, 8)
    as_ulysses = pool(world).run(run_sharded, "usp", "zigzag", True, shape, degrees={"ulysses": world, "ring": 1})
    ulysses = pool(world).run(run_sharded, "ulysses", "zigzag", True, shape, degrees={"ulysses": world, "ring": 1})
    as_ring = pool(world).run(run_sharded, "usp", "zigzag", True, shape, degrees={"ulysses": 1, "ring": world})
    ring = pool(world).run(run_sharded, "ring", "zigzag", True, shape, degrees={"ulysses": 1, "ring": world})
    for key in KEYS:
        assert torch.equal(as_ulysses[0][key], ulysses[0][key]), key
        assert torch.equal(as_ring[0][key], ring[0][key]), key


@pytest.mark.parametrize("world,heads,kv", [(4, 6, 6), (2, 5, 5), (4, 8, 1), (4, 6, 3), (4, 6, 2)])
@pytest.mark.parametrize("strategy", ["ulysses", "usp"])
def test_uneven_heads(pool, world, heads, kv, strategy):
    shape = (1, 32, heads, kv, 8)
    degrees = {"ulysses": world} if strategy == "ulysses" else {"ulysses": 2, "ring": world // 2}
    res = pool(world).run(run_sharded, strategy, "zigzag", True, shape, degrees=degrees)
    _check(res, shape, True)


CU = [0, 13, 40, 41, 64]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_documents_equal_each_document_alone(pool, world, strategy, causal):
    shape = (2, 64, 4, 2, 8)
    degrees = {"ulysses": 2, "ring": world // 2} if strategy == "usp" else {}
    res = pool(world).run(run_sharded, strategy, "zigzag", causal, shape, cu_seqlens=CU, degrees=degrees)
    _check(res, shape, causal, cu_seqlens=CU)
    # each document padded to a multiple of 2N; reported, never truncated
    unit = 2 * world
    assert res[0]["local"] * world == sum(-(-(b - a) // unit) * unit for a, b in zip(CU, CU[1:]))


def test_packed_zigzag_keeps_causal_work_balanced(pool):
    res = pool(4).run(run_sharded, "ring", "zigzag", True, (1, 64, 2, 2, 8), cu_seqlens=[0, 16, 48, 64])
    assert len({r["pairs"] for r in res}) == 1, [r["pairs"] for r in res]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "stripe"])
def test_any_length_is_padded_and_masked(pool, world, strategy, layout):
    shape = (1, 37, 4, 2, 8)
    degrees = {"ulysses": 2, "ring": world // 2} if strategy == "usp" else {}
    res = pool(world).run(run_sharded, strategy, layout, True, shape, degrees=degrees, pad=True)
    _check(res, shape, True)
    unit = world * (2 if layout == "zigzag" else 1)
    assert res[0]["padding"] == [-(-37 // unit) * unit - 37]


WINDOWS = [((5, 0), True), ((3, 2), False), ((-1, 4), False), ((9, -1), False)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("window,causal", WINDOWS, ids=[str(w) for w, _ in WINDOWS])
def test_sliding_window(pool, world, strategy, window, causal):
    shape = (1, 64, 4, 2, 8)
    degrees = {"ulysses": 2, "ring": world // 2} if strategy == "usp" else {}
    res = pool(world).run(run_sharded, strategy, "zigzag", causal, shape, window=window, degrees=degrees)
    _check(res, shape, causal, window=window)


def test_window_with_packing(pool):
    shape = (1, 64, 4, 2, 8)
    res = pool(4).run(run_sharded, "ring", "zigzag", True, shape, window=(6, 0), cu_seqlens=CU)
    _check(res, shape, True, window=(6, 0), cu_seqlens=CU)


def test_ring_skips_blocks_outside_the_window(pool):
    """Kernel work equals the visible pairs exactly: blocks outside the window cost nothing."""
    s, w = 256, 8
    res = pool(4).run(run_sharded, "ring", "contiguous", True, (1, s, 2, 2, 8), window=(w, 0))
    visible = sum(min(i, w) + 1 for i in range(s))
    assert sum(r["pairs"] for r in res) == visible


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "usp"])
def test_long_documents_take_the_fused_run_path(pool, strategy):
    """Documents long enough that every zigzag chunk is one fused call (no bias tiles)."""
    cu = [0, 300, 700, 701, 1024]
    shape = (1, 1024, 4, 2, 8)
    degrees = {"ulysses": 2, "ring": 2} if strategy == "usp" else {}
    res = pool(4).run(run_sharded, strategy, "zigzag", True, shape, cu_seqlens=cu, degrees=degrees)
    _check(res, shape, True, cu_seqlens=cu)
    _check(pool(4).run(run_sharded, strategy, "zigzag", True, shape, cu_seqlens=cu, degrees=degrees,
                       window=(40, 0)), shape, True, cu_seqlens=cu, window=(40, 0))
