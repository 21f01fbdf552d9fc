"""Which kernel each block gets: CUDA dispatch mocked on CPU (fused varlen for masked blocks), float32 merges
on every backend, the counted math fallback, and clear errors for a kernel the device cannot run."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.attention.blocks import empty_accumulators, forward_block
from seqpar.attention.plans import Block, MetaPlan
from seqpar.core import kernels
from seqpar.core.kernels import Task
from seqpar.core.layout import get_layout
from seqpar.core.packing import seq_info
from tests.attention.cases import assemble, run_attention, run_cuda_dispatch
from tests.core.cuda_mock import cuda_dispatch
from tests.helpers import masked_reference, max_err, qkv, sdpa_reference

KEYS = ("out", "dq", "dk", "dv")


def test_pick_backend_as_on_a_gpu():
    q = torch.empty(1, 4, 2, 128, dtype=torch.bfloat16)
    with cuda_dispatch(capability=(9, 0)):
        assert kernels.pick_backend(q) == "cudnn" and kernels.varlen_supported(q, "cudnn")
        assert kernels.pick_backend(q.float()) == "efficient" and not kernels.varlen_supported(q.float(), "efficient")
    with cuda_dispatch(capability=(8, 0)):
        assert kernels.pick_backend(q) == "flash"


def test_a_cuda_kernel_on_cpu_tensors_is_refused_by_name():
    q = torch.randn(1, 4, 2, 8)
    for backend in ("flash", "cudnn", "efficient"):
        with pytest.raises(seqpar.ConfigError, match=f"backend='{backend}' runs on CUDA tensors, but q is on cpu"):
            kernels.attention_with_lse(q, q, q, backend=backend)
        with pytest.raises(seqpar.ConfigError, match="runs on CUDA tensors"):
            seqpar.attention(q, q, q, backend=backend, mesh=seqpar.Mesh())


def test_varlen_arguments_of_packed_zigzag_blocks():
    """Two ranks, documents of 8 and 16 tokens in zigzag: rank 0's blocks as flash-attn varlen calls."""
    info = seq_info(get_layout("zigzag"), 2, cu_seqlens=[0, 8, 24])
    plan = MetaPlan([info.meta(r) for r in range(2)], causal=True)
    own = plan.block(0, 0, "cpu", fused=True)
    # both documents' two chunks are adjacent on the rank and causal over them: one sequence each, one call
    [call] = own.calls
    assert (call.q_index, call.k_index, call.cu_q, call.cu_k, call.window) == (
        slice(0, 12), slice(0, 12), [0, 4, 12], [0, 4, 12], (-1, 0))
    assert (call.max_q, call.max_k) == (8, 8)
    other = plan.block(0, 1, "cpu", fused=True)
    # only each document's late chunk sees rank 1's keys, all of them: no mask, query rows gathered
    [call] = other.calls
    assert call.q_index.tolist() == [2, 3, 8, 9, 10, 11] and call.k_index == slice(0, 12)
    assert (call.cu_q, call.cu_k, call.window, call.max_q, call.max_k) == ([0, 2, 6], [0, 4, 12], (-1, -1), 4, 8)
    cu_q, cu_k = call.cu(2)  # batch 2 folded into the token dim, int32 as flash-attn takes
    assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 2, 6, 8, 12] and cu_k.tolist() == [0, 4, 12, 16, 24]
    assert plan.work(0, fused=True) == (plan.work(0)[0], 2)  # the same pairs, two kernel calls


CU = [0, 13, 40, 64]
MASKS = [(True, CU, None), (True, None, (6, 0)), (False, None, (5, 2)), (True, CU, (9, 0))]
RUNS = [("ring", 2, {}), ("allgather", 2, {}), ("ulysses", 2, {}), ("usp", 4, {"ulysses": 2, "ring": 2})]


@pytest.mark.parametrize("strategy,world,degrees", RUNS, ids=[r[0] for r in RUNS])
@pytest.mark.parametrize("causal,cu,window", MASKS, ids=["packed", "window", "band", "packed-window"])
def test_masked_blocks_run_fused_varlen_on_cuda(pool, strategy, world, degrees, causal, cu, window):
    """On a GPU (mocked) every masked block runs the flash op's varlen form, never the math kernel, and the
    result (forward and gradients, bfloat16) is as close to float64 as one single-device bf16 call."""
    shape = (1, 64, 4, 2, 8)
    res = pool(world).run(run_cuda_dispatch, strategy, causal, cu, window, degrees)
    q, k, v, do = qkv(shape, 0)
    exact = masked_reference(q, k, v, do, causal=causal, cu_seqlens=cu, window=window)
    single = masked_reference(*(t.bfloat16().double() for t in (q, k, v, do)), causal=causal, cu_seqlens=cu,
                              window=window)
    for r in res:
        assert set(r["kernels"]) == {"flash_varlen"}, r["kernels"]
        assert r["ops"] == ["flash_varlen_backward", "flash_varlen_forward"]
    for key, e, s in zip(KEYS, exact, single):
        budget = max(1.5 * max_err(s.bfloat16(), e), torch.finfo(torch.bfloat16).eps * e.abs().max().item())
        assert max_err(res[0][key], e) <= budget, (key, max_err(res[0][key], e), budget)


def test_math_backend_merges_blocks_in_float32():
    """backend='math' in bfloat16: a block's partial output and gradients stay float32 until the final cast, as
    the fused kernels' merges do.  Eight key blocks of near-uniform attention: each block's mean of V is larger
    than the whole one's, so rounding it to bf16 before the merge cost up to 1.3x one bf16 SDPA call's error."""
    shape = (1, 1024, 4, 2, 32)
    q, k, v, do = qkv(shape, 3)
    q = q * 0.05
    exact = sdpa_reference(q, k, v, do, False)[0]
    single = sdpa_reference(*(t.bfloat16() for t in (q, k, v, do)), False, dtype=torch.bfloat16)[0]
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    acc, lse = empty_accumulators(qb)
    block = Block([Task(slice(0, 1024), slice(i * 128, (i + 1) * 128), False) for i in range(8)])
    with seqpar.stats.track() as st:
        forward_block(qb, kb, vb, block, acc, lse, scale=32 ** -0.5, backend="math")
    assert st.kernels == {"math": 8}  # the dense last resort is counted
    assert max_err(acc.bfloat16(), exact) <= max_err(single, exact)
    out, part_lse = kernels.block_forward(qb, kb[:, :128], vb[:, :128], causal=False, scale=0.2, backend="math")
    grads = kernels.block_backward(torch.ones_like(qb), qb, kb[:, :128], vb[:, :128], out.bfloat16(), part_lse,
                                   causal=False, scale=0.2, backend="math")
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)


def test_math_backend_in_a_ring_is_counted(pool):
    res = pool(2).run(run_attention, "ring", "zigzag", True, "bfloat16", (1, 32, 4, 2, 8), 0, "auto", True, False,
                      "math")
    assert all(set(r["stats"]["kernels"]) == {"math"} for r in res)
