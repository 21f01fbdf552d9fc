"""attention_with_lse and merge against a float64 softmax(QK^T)V, including every CPU-op trap."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqpar import ShapeError
from seqpar.core.kernels import attention_with_lse, mask_pieces, merge, merge_into, reference_attention

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _inputs(b, lq, lk, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, hh, d, generator=g, dtype=torch.float64) for n, hh in ((lq, h), (lk, hkv), (lk, hkv))]


def _check(q, k, v, dtype, backend, causal, offset, tol):
    qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(qq, kk, vv, causal=causal, causal_offset=offset, backend=backend)
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, causal=causal, causal_offset=offset)
    g = torch.randn_like(ref_out)
    out.backward(g.to(dtype))
    ref_out.backward(g)
    seen = torch.isfinite(ref_lse)
    assert torch.isneginf(lse[~seen]).all(), "rows with no visible key must have lse -inf"
    assert (out.double().transpose(1, 2)[~seen] == 0).all(), "rows with no visible key must output 0"
    assert (lse.double()[seen] - ref_lse[seen]).abs().max().item() < tol if seen.any() else True
    for a, b in ((out, ref_out), (qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        assert (a.double() - b).abs().max().item() < tol
    assert not torch.isnan(torch.cat([qq.grad.flatten(), kk.grad.flatten(), vv.grad.flatten()])).any()


CASES = [  # lq, lk, causal, offset
    (16, 16, False, 0), (16, 16, True, 0), (8, 16, True, 0), (16, 8, True, 0), (16, 24, True, 5),
    (16, 16, True, -5), (16, 16, True, -16), (16, 16, True, 40), (12, 12, True, 11), (12, 12, True, -11),
]


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lq,lk,causal,offset", CASES)
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])
def test_matches_float64_reference(backend, dtype, lq, lk, causal, offset, h, hkv):
    q, k, v = _inputs(2, lq, lk, h, hkv, 16)
    _check(q, k, v, dtype, backend, causal, offset, TOL[dtype])


@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 7), (True, -7)])
def test_bfloat16_no_worse_than_the_fused_op(causal, offset):
    """Offsets are cut into fused calls plus a float32 merge: no looser than one bf16 SDPA call."""
    q, k, v = _inputs(1, 64, 64, 4, 2, 32)
    out, _ = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal, causal_offset=offset)
    ref, _ = reference_attention(q, k, v, causal=causal, causal_offset=offset)
    plain, _ = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
    plain_ref, _ = reference_attention(q, k, v, causal=causal)
    budget = 1.5 * (plain.double() - plain_ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= budget


def test_mask_pieces_cover_the_offset_mask_with_square_causal_pieces():
    """Exhaustive over small blocks: the pieces tile exactly the visible pairs (j <= i + d), each pair
    once, and every causal piece is square, where top-left and bottom-right kernels agree."""
    for lq in range(1, 7):
        for lk in range(1, 7):
            for d in range(-lq - 1, lk + 1):
                want = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + d
                got = torch.zeros(lq, lk, dtype=torch.int64)
                for p in mask_pieces(lq, lk, True, d):
                    m, n = p.q.stop - p.q.start, p.k.stop - p.k.start
                    assert m > 0 and n > 0
                    if p.causal:
                        assert m == n, (lq, lk, d, p)
                        got[p.q, p.k] += torch.ones(m, n, dtype=torch.int64).tril()
                    else:
                        got[p.q, p.k] += 1
                assert torch.equal(got, want.long()), (lq, lk, d)


def test_mask_pieces_convention():
    assert mask_pieces(4, 4, False) == mask_pieces(4, 4, True, 3)  # offset >= lk-1 sees everything
    assert mask_pieces(4, 4, True, -4) == []  # offset <= -lq sees nothing
    assert len(mask_pieces(4, 8, True, 2)) == 2  # a strip of full keys plus a causal part
    assert mask_pieces(0, 4, True) == [] and mask_pieces(4, 0, False) == []


def test_zero_length_does_not_kill_the_process():
    q = torch.randn(1, 0, 2, 8, requires_grad=True)
    k = torch.randn(1, 4, 2, 8, requires_grad=True)
    out, lse = attention_with_lse(q, k, k)
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 2, 0)
    out2, lse2 = attention_with_lse(torch.randn(1, 3, 2, 8), k[:, :0], k[:, :0])
    assert (out2 == 0).all() and torch.isneginf(lse2).all()
    (out.sum() + out2.sum()).backward()


def test_heads_not_divisible_raise_instead_of_nan():
    with pytest.raises(ShapeError, match="q heads=8 not divisible by kv heads=3"):
        attention_with_lse(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))


def test_merge_of_halves_equals_whole_and_is_exact_with_empty_side():
    q, k, v = _inputs(2, 8, 16, 4, 2, 8)
    whole_out, whole_lse = reference_attention(q, k, v)
    a = reference_attention(q, k[:, :5], v[:, :5])
    b = reference_attention(q, k[:, 5:], v[:, 5:])
    out, lse = merge(*a, *b)
    assert torch.allclose(out, whole_out, atol=1e-12) and torch.allclose(lse, whole_lse, atol=1e-12)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    out, lse = merge(*empty, *a)
    assert torch.equal(out, a[0]) and torch.equal(lse, a[1])
    out, lse = merge(*empty, *empty)
    assert (out == 0).all() and torch.isneginf(lse).all() and not torch.isnan(out).any()


def test_merge_is_float32_for_bfloat16_partials():
    out, lse = merge(torch.ones(1, 2, 1, 4, dtype=torch.bfloat16), torch.zeros(1, 1, 2),
                     torch.ones(1, 2, 1, 4, dtype=torch.bfloat16), torch.zeros(1, 1, 2))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@given(lq=st.integers(1, 12), lk=st.integers(1, 12), offset=st.integers(-14, 14), causal=st.booleans(),
       kv=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_property_offsets(lq, lk, offset, causal, kv, seed):
    q, k, v = _inputs(1, lq, lk, 2, kv, 8, seed)
    _check(q, k, v, torch.float64, "cpu_flash", causal, offset, 1e-10)


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("causal,offset", [(False, 0), (True, 0), (True, 2), (True, -2)])
def test_gradcheck_float64(backend, causal, offset):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 5, 6, 2, 1, 4))
    fn = lambda q, k, v: attention_with_lse(q, k, v, causal=causal, causal_offset=offset, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_merge_edge_rows():
    """No key on either side gives out 0 and lse -inf; one empty side gives the other exactly; NaN spreads;
    accumulators of another float dtype than the parts' lse are fine."""
    ninf = float("-inf")
    out_a, out_b = torch.ones(1, 3, 1, 2), 2 * torch.ones(1, 3, 1, 2)
    lse_a, lse_b = torch.tensor([[[ninf, ninf, 0.5]]]), torch.tensor([[[ninf, 0.25, float("nan")]]])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert out[0, 0].eq(0).all() and lse[0, 0, 0] == ninf
    assert out[0, 1].eq(2).all() and lse[0, 0, 1] == 0.25
    assert out[0, 2].isnan().all() and lse[0, 0, 2].isnan()
    acc, acc_lse = torch.zeros(1, 3, 1, 2, dtype=torch.float64), torch.full((1, 1, 3), ninf)
    merge_into(acc, acc_lse, out_b, torch.zeros(1, 1, 3))
    assert acc.eq(2).all() and acc_lse.eq(0).all()
