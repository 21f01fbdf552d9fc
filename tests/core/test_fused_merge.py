"""The fused Triton merge equals the PyTorch merge (run by Triton's interpreter on CPU; skipped without Triton)."""
from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton", reason="the fused merge needs Triton (it ships with CUDA builds of torch)")

from seqpar.core import fused_merge, kernels  # noqa: E402

# the interpreter evaluates both sides of tl.where with numpy: -inf - -inf in the branch not taken
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter (CPU tensors), the kernel rebuilt under it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(fused_merge._STATE, "kernel", None)
    monkeypatch.setitem(fused_merge._STATE, "failed", False)
    yield
    fused_merge._STATE["kernel"] = None


def _torch_merge(acc, acc_lse, out, lse):
    acc, acc_lse = acc.clone(), acc_lse.clone()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SEQPAR_FUSED_MERGE", "0")
        kernels.merge_into(acc, acc_lse, out, lse)
    return acc, acc_lse


@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_merge_equals_torch(interpreted, d, dtype):
    g = torch.Generator().manual_seed(d)
    b, lfull, h = 2, 12, 3
    acc_full = torch.randn(b, lfull, h, d, generator=g)
    acc_lse_full = torch.randn(b, h, lfull, generator=g)
    acc_lse_full[0, 1, :3] = float("-inf")  # rows with no key yet
    out = torch.randn(b, 7, h, d, generator=g).to(dtype)
    lse = torch.randn(b, h, 7, generator=g)
    lse[0, 1, :2] = float("-inf")  # both sides empty on rows 2..3 of the view, one side on row 4
    lse[1, 0, 5] = float("nan")
    lse[1, 2, 1] = float("nan")
    acc_lse_full[1, 2, 3] = float("-inf")  # a NaN against an empty side stays NaN (maxnum would drop it)
    acc_lse_full[0, 0, 4] = float("nan")
    lse[0, 0, 2] = float("-inf")
    rows = slice(2, 9)  # a strided view of the accumulators, as the ring merges a query slice
    want_acc, want_lse = _torch_merge(acc_full[:, rows], acc_lse_full[:, :, rows], out, lse)
    acc, acc_lse = acc_full.clone(), acc_lse_full.clone()
    assert fused_merge.merge_into(acc[:, rows], acc_lse[:, :, rows], out, lse)
    torch.testing.assert_close(acc[:, rows], want_acc, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(acc_lse[:, :, rows], want_lse, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert torch.equal(acc[:, :2], acc_full[:, :2]) and torch.equal(acc[:, 9:], acc_full[:, 9:])  # untouched


def test_not_used_where_it_does_not_apply(interpreted, monkeypatch):
    acc, acc_lse = torch.zeros(1, 4, 2, 8, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    assert not fused_merge.merge_into(acc, acc_lse, acc, acc_lse)  # float64: the PyTorch path
    monkeypatch.setenv("SEQPAR_FUSED_MERGE", "0")
    acc, acc_lse = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)
    assert not fused_merge.merge_into(acc, acc_lse, acc, acc_lse)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("SEQPAR_FUSED_MERGE")
    assert not fused_merge.merge_into(acc, acc_lse, acc, acc_lse)  # CPU tensors without the interpreter


def test_ring_attention_with_the_fused_merge(interpreted):
    """The whole ring block loop (world 1 emulation of 4 ranks' blocks) with the fused merge equals SDPA."""
    from tests.helpers import qkv, sdpa_reference
    from seqpar.attention.blocks import empty_accumulators, forward_block
    from seqpar.attention.plans import Block
    from seqpar.core.layout import get_layout

    q, k, v, do = qkv((1, 32, 4, 2, 16), 0, dtype=torch.float32)
    lay, n = get_layout("zigzag"), 4
    want = sdpa_reference(q, k, v, do, True)[0]
    for r in range(n):
        idx = lay.indices(32, n, r)
        acc, acc_lse = empty_accumulators(q[:, idx])
        for src in range(n):
            block = Block(lay.ring_tasks(n, r, src, 8, True))
            forward_block(q[:, idx], k[:, lay.indices(32, n, src)], v[:, lay.indices(32, n, src)], block, acc,
                          acc_lse, scale=16 ** -0.5, backend="cpu_flash")
        torch.testing.assert_close(acc.double(), want[:, idx], atol=1e-5, rtol=1e-5)
