"""Communication counts, causal work balance, numerical drift and bad input for seqpar.attention."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import seqpar
from seqpar.launch.pool import get_pool
from tests.attention.cases import assemble, run_attention, run_invalid
from tests.helpers import max_err, qkv, sdpa_reference


def _stats(pool, world, strategy, layout="zigzag", causal=True, shape=(1, 32, 4, 2, 8), **kw):
    res = pool(world).run(run_attention, strategy, layout, causal, "float32", shape, stats=True, **kw)
    return [r["stats"] for r in res]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ring_sends_n_minus_1_kv_blocks_forward_at_kv_heads(pool, world):
    b, s, h, hkv, d = shape = (1, 64, 8, 2, 8)
    for st_ in _stats(pool, world, "ring", shape=shape):
        assert st_["fwd_calls"] == {"ring_exchange": world - 1}
        block = 2 * b * (s // world) * hkv * d * 4  # K and V together, float32, kv heads only
        assert st_["fwd_bytes"]["ring_exchange"] == (world - 1) * block
        # backward: K/V rotate again (N-1) and their float32 gradient travels home (N)
        assert st_["calls"] == {"ring_exchange": (world - 1) + (world - 1) + world}


@pytest.mark.parametrize("world", [2, 4])
def test_collective_counts_per_strategy(pool, world):
    ag = _stats(pool, world, "allgather")[0]
    assert ag["fwd_calls"] == {"all_gather": 1}
    assert ag["calls"] == {"all_gather": 2, "reduce_scatter": 1}
    ul = _stats(pool, world, "ulysses")[0]
    assert ul["fwd_calls"] == {"all_to_all": 2}  # q, k, v packed into one, and the output
    assert ul["calls"] == {"all_to_all": 4}
    qkav = _stats(pool, world, "ring_qk_av")[0]
    assert qkav["fwd_calls"] == {"ring_exchange": 2 * (world - 1)}
    assert qkav["calls"] == {"ring_exchange": 4 * (world - 1) + 2 * world}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_causal_work(pool, world):
    shape = (1, 16 * world, 2, 2, 8)
    pairs = [st_["pairs"] for st_ in _stats(pool, world, "ring", "zigzag", shape=shape)]
    assert len(set(pairs)) == 1, pairs
    s = shape[1]
    assert sum(pairs) == s * (s + 1) // 2  # exactly the causal triangle: masked blocks skipped
    contiguous = [st_["pairs"] for st_ in _stats(pool, world, "ring", "contiguous", shape=shape)]
    assert sum(contiguous) == sum(pairs) and max(contiguous) > min(contiguous)


def test_bfloat16_drift_at_world_8(pool):
    """At world 8 in bf16 the ring's error vs float64 stays within 1.5x the single-device bf16 kernel's.

    (Per-block bf16 rounding of partial dK/dV used to reach 2.4x at S=1024; blocks now stay float32.)"""
    shape = (1, 1024, 8, 2, 64)
    q, k, v, do = qkv(shape, 1)
    exact = sdpa_reference(q, k, v, do, True)
    single = sdpa_reference(*(t.bfloat16() for t in (q, k, v, do)), True, dtype=torch.bfloat16)
    for world in (1, 2, 4, 8):
        res = pool(world).run(run_attention, "ring", "zigzag", True, "bfloat16", shape, seed=1)
        for key, s, e in zip(["out", "dq", "dk", "dv"], single, exact):
            err, budget = max_err(assemble(res, key, shape[1]), e), max_err(s, e)
            assert err <= 1.5 * budget, (world, key, err, budget)


@pytest.mark.parametrize("call,needle", [
    ("strategy", "unknown strategy"), ("layout", "unknown layout"), ("window", "must be (left, right)"),
    ("usp_group", "strategy='usp' needs a 2-D mesh"), ("cu_seqlens", "does not match the"),
    ("cu_order", "strictly increasing"),
    ("gqa", "not divisible by kv heads"), ("dims", "must be [batch, seq, heads, head_dim]"),
    ("mismatch", "must have the same shape"), ("odd", "layout 'zigzag'"), ("dtype", "dtypes differ"),
    ("integer", "must be floating point"), ("head_dim", "head_dim is 0"), ("float_cu", "cu_seqlens must hold integers"),
    ("float_cu_list", "cu_seqlens must hold integers"), ("backend", "backend='flash' runs on CUDA tensors"),
    ("scale", "scale=nan must be a finite number"),
    ("layout_mismatch", "q was sharded with layout 'contiguous' over 4 ranks, one sequence of 32 tokens, but "
                        "attention (ring) was called for layout 'zigzag'"),
    ("packing_mismatch", "q was sharded with layout 'zigzag' over 4 ranks, one sequence of 32 tokens, but attention "
                         "(ring) was called for layout 'zigzag' over 4 ranks, 2 packed documents"),
    ("padding_mismatch", "padded to 32, but attention (ring) was called for layout 'zigzag' over 4 ranks, one "
                         "sequence of 32 tokens"),
])
def test_bad_input_fails_on_every_rank_before_any_collective(pool, call, needle):
    for res in pool(4).run(run_invalid, call):
        assert res["type"] is not None, f"{call}: no error raised"
        assert needle in res["msg"], res["msg"]
        assert res["comm"] == {}, f"{call}: communicated before failing: {res['comm']}"


@given(world=st.sampled_from([1, 2, 4]), strategy=st.sampled_from(["ring", "allgather", "ulysses", "ring_qk_av"]),
       layout=st.sampled_from(["contiguous", "zigzag", "stripe"]), causal=st.booleans(),
       chunks=st.integers(1, 3), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       d=st.sampled_from([4, 8, 16]), b=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_property_random_shapes(world, strategy, layout, causal, chunks, kv, group, d, b, seed):
    shape = (b, 2 * world * chunks, kv * group, kv, d)
    res = get_pool(world).run(run_attention, strategy, layout, causal, "float32", shape, seed=seed)
    q, k, v, do = qkv(shape, seed)
    ref = sdpa_reference(q, k, v, do, causal)
    for key, r in zip(["out", "dq", "dk", "dv"], ref):
        assert max_err(assemble(res, key, shape[1]), r) < 5e-5, key


def saved_by_strategy(strategy: str):
    from seqpar.core.stats import saved_activations
    from tests.helpers import mesh

    mesh()
    q = torch.randn(1, 64, 4, 16, requires_grad=True)
    k = torch.randn(1, 64, 2, 16, requires_grad=True)
    v = torch.randn(1, 64, 2, 16, requires_grad=True)
    with saved_activations() as saved:
        import seqpar

        seqpar.attention(q, k, v, causal=True, strategy=strategy)
    return saved.bytes


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_ring_and_allgather_keep_only_q_k_v_out_lse(pool, strategy):
    """Activation memory O(S/N): exactly the local q, k, v, output and float32 lse are saved for backward."""
    q_bytes, kv_bytes, lse_bytes = 64 * 4 * 16 * 4, 64 * 2 * 16 * 4, 4 * 64 * 4
    for saved in pool(4).run(saved_by_strategy, strategy):
        assert saved == 2 * q_bytes + 2 * kv_bytes + lse_bytes


def local_under_trivial_mesh():
    from seqpar.core.mesh import Mesh
    from tests.helpers import mesh

    mesh()  # a default 4-rank mesh exists in this process
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    out = {}
    import seqpar

    for strategy in ("ring", "ring_qk_av", "allgather", "ulysses"):
        o = seqpar.attention(q, q, q, causal=True, strategy=strategy, mesh=Mesh())
        o.sum().backward()
        out[strategy] = o.detach()
    padded, info = seqpar.shard(torch.randn(1, 7, 2, 8, requires_grad=True), mesh=Mesh(), return_info=True)
    padded.sum().backward()
    return out, info.padding


def test_explicit_single_process_mesh_stays_local_inside_a_world(pool):
    """mesh=Mesh() means one process even when a default multi-rank mesh exists: no collective, no hang."""
    res = pool(2).run(local_under_trivial_mesh, timeout=60)
    for out, padding in res:
        assert padding == 1
        for o in out.values():
            assert torch.allclose(o, out["ring"], atol=1e-6)


def single_process_any_length():
    """One process: zigzag needs no split, so any length runs unpadded (sharding, attention, unsharding)."""
    from seqpar.core.mesh import Mesh

    mesh_1 = Mesh()
    q, k, v = (torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    local = seqpar.shard(q, 1, mesh=mesh_1)
    out = seqpar.attention(local, k, v, causal=True, mesh=mesh_1, layout="zigzag")
    back = seqpar.unshard(out, 1, mesh=mesh_1)
    pos = seqpar.position_ids(7, mesh=mesh_1)
    return local.shape[1], back.detach(), pos


def test_single_process_takes_any_length_in_zigzag():
    n, out, pos = single_process_any_length()
    assert n == 7 and pos.tolist() == list(range(7)) and out.shape == (1, 7, 2, 8)


@pytest.mark.parametrize("scale", [0.0, -0.3, 1e-3])
@pytest.mark.parametrize("causal", [False, True])
def test_any_real_scale_works(causal, scale):
    """scale <= 0 gave NaN through the CPU flash kernel under a causal mask: q is scaled instead."""
    from seqpar.core.kernels import attention_with_lse, reference_attention
    from seqpar.core.mesh import Mesh

    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    want, _ = reference_attention(q, k, v, causal=causal, scale=scale)
    out = seqpar.attention(q, k, v, causal=causal, scale=scale, mesh=Mesh())
    assert torch.allclose(out, want, atol=1e-10)
    out, _ = attention_with_lse(q, k, v, causal=causal, scale=scale)
    assert torch.allclose(out, want, atol=1e-10)


def sharded_then_gathered_loss(grad: str):
    """Every rank computes the same loss on the unsharded output: the gradient of q with unshard's grad mode."""
    from tests.helpers import mesh

    m = mesh()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = seqpar.attention(*(seqpar.shard(t, 1) for t in (q, k, v)), causal=True)
    full = seqpar.unshard(out, 1, grad=grad)
    (full ** 2).sum().backward()
    return q.grad


def test_unshard_gradient_for_a_loss_every_rank_computes(pool):
    """A loss on unshard(out) on every rank: 'replicated' gives the single-device gradient, the default 'sum'
    (the dual of the all-gather) counts it once per rank, as documented."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True) ** 2).sum().backward()
    for world in (2, 4):
        for got in pool(world).run(sharded_then_gathered_loss, "replicated"):
            assert torch.allclose(got, q.grad, atol=1e-10)
        for got in pool(world).run(sharded_then_gathered_loss, "sum"):
            assert torch.allclose(got, world * q.grad, atol=1e-10)
