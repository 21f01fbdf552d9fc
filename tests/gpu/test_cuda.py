"""Smoke tests of seqpar's CUDA paths: kernels, sequence-parallel attention, inference, training.

Why: the CUDA code (the cuDNN / flash / efficient / math kernels behind ``kernels.pick_backend``,
the strategies and the gloo transport with CUDA tensors, inference and training on a GPU) is
written but cannot run in CI. These tests are the first thing a GPU session runs
(``benchmarks/gpu_checks.sh``), so they are small (about a minute on one GPU) and compare
every path against float64 references, as the CPU suite does.

``SEQPAR_TEST_DEVICE`` names the device (default: ``cuda`` where available, else ``cpu``, so
CI on CPU runs these very checks and they cannot rot between GPU sessions; they take seconds).
``SEQPAR_TEST_DEVICE=cuda`` without CUDA skips the module. One GPU cannot hold two NCCL ranks, so multi-rank tests run several processes on cuda:0
over gloo (collectives take CUDA tensors; point-to-point sends do not, which is why the ring
transport is left on ``auto`` = all-to-all over gloo).
"""
from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import seqpar
from seqpar.inference import generate
from seqpar.core import kernels
from seqpar.core.kernels import attention_with_lse, pick_backend, reference_attention
from seqpar.core.mesh import Mesh
from seqpar.models import LlamaForCausalLM
from seqpar.train import causal_lm_loss, shift_labels, sync_gradients
from tests.helpers import DTYPES, max_err, mesh, qkv, sdpa_reference

DEVICE = os.environ.get("SEQPAR_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"SEQPAR_TEST_DEVICE={DEVICE} but torch.cuda.is_available() is False "
                "(set SEQPAR_TEST_DEVICE=cpu to run these checks on CPU)", allow_module_level=True)

ON_CUDA = DEVICE.startswith("cuda")
# every kernel the device offers (what pick_backend may choose, and the portable math fallback)
_OTHER_DEVICE = {"cpu_flash"} if ON_CUDA else {"cudnn", "flash", "efficient"}
BACKENDS = [b for b in kernels.BACKENDS if b != "auto" and b not in _OTHER_DEVICE]
# documented input limits, skipped without a call: a kernel fed what it cannot take may fail hard
HALF_ONLY = {"cudnn", "flash"}
HALF = (torch.bfloat16, torch.float16)
FLOAT32_TOL = 1e-4  # errors of O(1) values; a wrong mask or merge is off by O(0.1)
TASK_TIMEOUT = 60.0  # per pool task: a hung collective fails one test, not the whole run
# phrasing of PyTorch / cuDNN errors meaning "this kernel does not take these inputs"
UNSUPPORTED = re.compile(r"not (supported|available|implemented)|only supports?|unsupported|does not support|"
                         r"no available kernel|no execution plans?|no valid execution|NOT_SUPPORTED", re.I)


def _half_budget(single_err: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Allowed max error in bf16/fp16: 1.5x one single-device fused call's (the CPU suite's contract), and
    at least one rounding of the largest value: pieces and ring blocks are merged in float32 from
    partial outputs the CUDA kernels (and the math backend) write in the input dtype, so the result
    can carry two roundings where one fused call has one."""
    return max(1.5 * single_err, torch.finfo(dtype).eps * ref.abs().max().item())


def _use(device: str) -> None:
    """In a worker: every rank shares cuda:0 (gloo), so make it the current device."""
    if device.startswith("cuda"):
        torch.cuda.set_device(0)


def _run(pool, world: int, fn, *args):
    return pool(world).run(fn, *args, timeout=TASK_TIMEOUT)


def _report_unsupported(what: str, exc: Exception) -> None:
    msg = f"{what}: unsupported on {DEVICE}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print(msg)
    warnings.warn(msg)
    pytest.skip(msg)


# --------------------------------------------------------------------------- kernels

KERNEL_CASES = [  # lq, lk, causal, causal_offset: square, odd and unequal lengths, both offset signs
    (64, 64, False, 0), (64, 64, True, 0), (37, 53, False, 0), (37, 53, True, 0), (53, 37, True, 0),
    (37, 53, True, 9), (53, 37, True, -7), (37, 53, True, -40),  # -40: no row sees any key
]


def _kernel_inputs(lq, lk, h, hkv, dtype, seed=0):
    """q, k, v, dout in ``dtype`` on the device (D=64: cuDNN's and flash's sizes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((lq, h), (lk, hkv), (lk, hkv), (lq, h))
    return [torch.randn(2, n, hh, 64, generator=g, dtype=torch.float64).to(DEVICE, dtype) for n, hh in shapes]


def _masked_sdpa(q, k, v, dout, causal, offset):
    """The single-device fused SDPA call on the same problem in the inputs' dtype: (out, dq, dk, dv).

    Rows that see no key are left out (SDPA would give NaN there; their true gradient is 0)."""
    lq, lk = q.shape[1], k.shape[1]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(lk, device=q.device)[None] <= torch.arange(lq, device=q.device)[:, None] + offset
    rows = keep.any(-1)
    qq, kk, vv = (t.detach().transpose(1, 2).clone().requires_grad_() for t in (q, k, v))
    # kv heads repeated by hand: with a mask, enable_gqa would send CUDA to the (float32) math fallback
    rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(qq[:, :, rows], kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                         attn_mask=keep[rows])
    out.backward(dout.transpose(1, 2)[:, :, rows])
    full_out = torch.zeros_like(qq)
    full_out[:, :, rows] = out.detach()
    return tuple(t.transpose(1, 2) for t in (full_out, qq.grad, kk.grad, vv.grad))


def _attend(backend, q, k, v, dout, causal, offset):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(qq, kk, vv, causal=causal, causal_offset=offset, backend=backend)
    out.backward(dout)
    return out.detach(), lse, qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lq,lk,causal,offset", KERNEL_CASES)
@pytest.mark.parametrize("h,hkv", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_kernel_matches_float64(backend, dtype, lq, lk, causal, offset, h, hkv):
    """attention_with_lse (out, lse, dq, dk, dv) against float64 on the same rounded inputs."""
    what = f"backend {backend} {dtype} Lq={lq} Lk={lk} causal={causal} offset={offset} H={h}/{hkv}"
    if backend in HALF_ONLY and dtype not in HALF:
        pytest.skip(f"{what}: the {backend} kernel takes float16/bfloat16 only")
    q, k, v, dout = _kernel_inputs(lq, lk, h, hkv, dtype)
    try:
        got = _attend(backend, q, k, v, dout, causal, offset)
        if ON_CUDA:
            torch.cuda.synchronize()
    except RuntimeError as exc:  # seqpar's own ShapeError is not a RuntimeError: it fails the test
        if not UNSUPPORTED.search(str(exc)):
            raise
        _report_unsupported(what, exc)
    out, lse, dq, dk, dv = got
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, causal=causal, causal_offset=offset)
    ref_out.backward(dout.double())
    assert out.device.type == q.device.type and out.dtype == dtype and lse.dtype == torch.float32
    seen = torch.isfinite(ref_lse)
    assert torch.isneginf(lse[~seen]).all(), f"{what}: rows with no visible key must have lse -inf"
    assert (out.transpose(1, 2)[~seen] == 0).all(), f"{what}: rows with no visible key must output 0"
    lse_err = (lse.double()[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    assert lse_err < (2e-3 if dtype in HALF else 1e-4), f"{what}: lse error {lse_err:.3g}"
    errs = {name: max_err(a, b) for name, a, b in
            zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out, q64.grad, k64.grad, v64.grad))}
    assert not any(math.isnan(e) for e in errs.values()), f"{what}: NaN {errs}"
    if dtype in HALF:
        if not seen.any():
            assert max(errs.values()) == 0, f"{what}: {errs}"
            return
        single = _masked_sdpa(q, k, v, dout, causal, offset)
        refs = (ref_out, q64.grad, k64.grad, v64.grad)
        for (name, err), s, r in zip(errs.items(), single, refs):
            budget = _half_budget(max_err(s, r), r, dtype)
            assert err <= budget, f"{what}: {name} error {err:.3g} > budget {budget:.3g} ({errs})"
    else:
        assert max(errs.values()) < FLOAT32_TOL, f"{what}: {errs}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_auto_backend_is_offered(dtype, head_dim):
    """pick_backend's automatic choice for the device is one of the kernels tested above."""
    choice = pick_backend(torch.empty(1, 1, 1, head_dim, device=DEVICE, dtype=dtype))
    print(f"pick_backend({DEVICE}, {dtype}, D={head_dim}) -> {choice}")
    assert choice in BACKENDS


# --------------------------------------------------------------------------- seqpar.attention on ranks

ATTN_SHAPE = (1, 64, 8, 2, 64)  # B, S, H, Hkv, D: GQA; D=64 lets pick_backend take cuDNN on Hopper
KEYS = ("out", "dq", "dk", "dv")


def attention_worker(device: str, strategy: str, layout: str, causal: bool, dtype: str, degrees: dict,
                     backend: str = "auto"):
    """This rank's shards of a seeded problem through seqpar.attention on ``device``; results on CPU."""
    _use(device)
    m = mesh(**degrees)
    q, k, v, do = qkv(ATTN_SHAPE, 0)
    # the global positions this rank holds, as seqpar.shard lays them out (nested over usp's 2-D mesh)
    idx = seqpar.shard(torch.arange(ATTN_SHAPE[1])[None], 1, layout=layout, mesh=m)[0]
    ql, kl, vl = (t[:, idx].to(device, DTYPES[dtype]).requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, layout=layout, mesh=m, backend=backend)
    out.backward(do[:, idx].to(device, DTYPES[dtype]))
    tensors = dict(zip(KEYS, (out.detach(), ql.grad, kl.grad, vl.grad)))
    return {"idx": idx, "devices": sorted({t.device.type for t in tensors.values()}),
            **{key: t.cpu() for key, t in tensors.items()}}


def _assemble(results, key):
    full = results[0][key].new_empty((ATTN_SHAPE[0], ATTN_SHAPE[1]) + tuple(results[0][key].shape[2:]))
    for res in results:
        full[:, res["idx"]] = res[key]
    return full


def _check_attention(results, causal: bool, dtype: str, what: str) -> None:
    assert all(r["devices"] == [torch.device(DEVICE).type] for r in results), (what, [r["devices"] for r in results])
    q, k, v, do = qkv(ATTN_SHAPE, 0)
    exact = sdpa_reference(q, k, v, do, causal)
    errs = {key: max_err(_assemble(results, key), e) for key, e in zip(KEYS, exact)}
    if dtype == "float32":
        assert max(errs.values()) < FLOAT32_TOL, (what, errs)
        return
    # the budget: one single-device fused call in the same dtype on the same device
    low = [t.to(DEVICE, DTYPES[dtype]) for t in (q, k, v, do)]
    single = sdpa_reference(*low, causal, dtype=DTYPES[dtype])
    for key, s, e in zip(KEYS, single, exact):
        budget = _half_budget(max_err(s.cpu(), e), e, DTYPES[dtype])
        assert errs[key] <= budget, f"{what}: {key} error {errs[key]:.3g} > budget {budget:.3g} {errs}"


# world, strategy, degrees: usp needs 4 ranks for a 2-D (ulysses=2 x ring=2) mesh
STRATEGY_RUNS = [(w, s, {}) for w in (2, 4) for s in ("ring", "ulysses", "allgather", "ring_qk_av")]
STRATEGY_RUNS.append((4, "usp", {"sp": 4, "ulysses": 2}))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal,layout", [(True, "zigzag"), (False, "contiguous")], ids=["causal-zigzag",
                                                                                          "full-contiguous"])
@pytest.mark.parametrize("world,strategy,degrees", STRATEGY_RUNS, ids=[f"w{w}-{s}" for w, s, _ in STRATEGY_RUNS])
def test_strategy_matches_float64(pool, world, strategy, degrees, causal, layout, dtype):
    results = _run(pool, world, attention_worker, DEVICE, strategy, layout, causal, dtype, degrees)
    _check_attention(results, causal, dtype, f"{strategy} world {world} {layout} causal={causal} {dtype}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cudnn"])
def test_ring_with_each_backend(pool, backend):
    """The automatic choice above is cuDNN on Hopper for bf16: the ring over the other kernels too."""
    dtype = "float32" if backend == "efficient" else "bfloat16"
    results = _run(pool, 4, attention_worker, DEVICE, "ring", "zigzag", True, dtype, {}, backend)
    _check_attention(results, True, dtype, f"ring over {backend}")


# --------------------------------------------------------------------------- packed documents and windows

MASK_CU = [0, 13, 40, 64]
MASKS = [(True, MASK_CU, None), (True, None, (9, 0)), (False, None, (5, 3)), (True, MASK_CU, (7, 0))]
MASK_IDS = ["packed", "window", "band", "packed-window"]


def masked_worker(device: str, strategy: str, causal: bool, cu, window, dtype: str, degrees: dict):
    """Full inputs -> seqpar.shard -> attention -> seqpar.unshard on ``device``; full output and input gradients
    on CPU, and the kernels the forward ran (seqpar.stats)."""
    _use(device)
    m = mesh(**degrees)
    q, k, v, do = (t.to(device, DTYPES[dtype]) for t in qkv(ATTN_SHAPE, 0))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with seqpar.stats.track() as st:
        ql, kl, vl = (seqpar.shard(t, 1, mesh=m, cu_seqlens=cu) for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, causal=causal, strategy=strategy, mesh=m, cu_seqlens=cu, window=window)
        kernels_fwd = dict(st.kernels)
    full = seqpar.unshard(out, 1, mesh=m, cu_seqlens=cu)
    full.backward(do / m.sp)  # unshard's backward sums the ranks' (identical) gradients
    return {"kernels": kernels_fwd, "devices": sorted({t.device.type for t in (full, q.grad)}),
            **{key: t.detach().cpu() for key, t in zip(KEYS, (full, q.grad, k.grad, v.grad))}}


MASKED_RUNS = [(2, s, {}) for s in ("ring", "ulysses", "allgather", "ring_qk_av")]
MASKED_RUNS.append((4, "usp", {"sp": 4, "ulysses": 2}))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal,cu,window", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("world,strategy,degrees", MASKED_RUNS, ids=[f"w{w}-{s}" for w, s, _ in MASKED_RUNS])
def test_packed_and_windowed_match_float64(pool, world, strategy, degrees, causal, cu, window, dtype):
    """Every strategy on packed documents and sliding windows; on CUDA in half precision every masked block
    runs the fused varlen kernel (never the dense math one), as close to float64 as one bf16 call."""
    from tests.helpers import masked_reference

    what = f"{strategy} world {world} causal={causal} cu_seqlens={cu} window={window} {dtype}"
    results = _run(pool, world, masked_worker, DEVICE, strategy, causal, cu, window, dtype, degrees)
    assert all(r["devices"] == [torch.device(DEVICE).type] for r in results), what
    if strategy != "ring_qk_av":  # ColossalAI's scheme computes its scores itself
        want = ({"flash_varlen"} if ON_CUDA and dtype == "bfloat16" else
                {"math", "efficient"} if ON_CUDA else {"cpu_flash"})
        assert all(set(r["kernels"]) <= want and r["kernels"] for r in results), (what, [r["kernels"] for r in results])
    q, k, v, do = qkv(ATTN_SHAPE, 0)
    exact = masked_reference(q, k, v, do, causal=causal, cu_seqlens=cu, window=window)
    errs = {key: max_err(results[0][key], e) for key, e in zip(KEYS, exact)}
    if dtype == "float32":
        assert max(errs.values()) < FLOAT32_TOL, (what, errs)
        return
    single = masked_reference(*(t.to(DTYPES[dtype]).double() for t in (q, k, v, do)), causal=causal, cu_seqlens=cu,
                              window=window)
    for key, s_, e in zip(KEYS, single, exact):
        budget = _half_budget(max_err(s_.to(DTYPES[dtype]), e), e, DTYPES[dtype])
        assert errs[key] <= budget, f"{what}: {key} error {errs[key]:.3g} > budget {budget:.3g} {errs}"


def compiled_worker(device: str, strategy: str, degrees: dict, backend: str):
    """compiled_vs_eager (tests.attention.cases) on ``device``: the largest difference, and any graph break."""
    from tests.attention.cases import compiled_vs_eager

    _use(device)
    return compiled_vs_eager(strategy, [(True, None, None), (True, MASK_CU, (7, 0))], degrees, backend,
                             device=device)


@pytest.mark.skipif(not ON_CUDA, reason="on CPU tests/attention/test_hot_path.py covers the compiled path")
@pytest.mark.parametrize("world,strategy,degrees", [(2, "ring", {}), (2, "ulysses", {}),
                                                    (4, "usp", {"sp": 4, "ulysses": 2})], ids=["ring", "ulysses", "usp"])
def test_compiled_equals_eager(pool, world, strategy, degrees):
    """torch.compile(fullgraph=True) of seqpar.attention on the device equals eager (plain causal, packed + window)."""
    for per_rank in _run(pool, world, compiled_worker, DEVICE, strategy, degrees, "aot_eager"):
        assert all(r == {"diff": 0.0, "breaks": 0} for r in per_rank), per_rank


# --------------------------------------------------------------------------- inference

PROMPT_SEED, NEW_TOKENS = 0, 6


def _tiny(m: Mesh, device: str, layout: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM("tiny", mesh=m, layout=layout, device=device)
    model.init_weights(PROMPT_SEED, std=0.1)  # std 0.1: logits spread enough for stable greedy choices
    return model.eval()


def _prompt(s: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, s), generator=torch.Generator().manual_seed(s))


def generate_worker(device: str, layout: str, s: int):
    _use(device)
    m = mesh()
    with torch.no_grad():
        tokens = generate(_tiny(m, device, layout), _prompt(s).to(device), NEW_TOKENS, strategy="ring")
    return {"device": tokens.device.type, "tokens": tokens.cpu()}


@pytest.mark.parametrize("layout,s", [("zigzag", 40), ("contiguous", 37)])
def test_generate_two_ranks_equals_one(pool, layout, s):
    """Greedy tokens on 2 ranks equal world-1 generation on the same device (float32)."""
    with torch.no_grad():
        want = generate(_tiny(Mesh(), DEVICE, "contiguous"), _prompt(s).to(DEVICE), NEW_TOKENS, Mesh()).cpu()
    assert want.shape == (2, s + NEW_TOKENS)
    for r in _run(pool, 2, generate_worker, DEVICE, layout, s):
        assert r["device"] == torch.device(DEVICE).type
        assert torch.equal(r["tokens"], want), (r["tokens"][:, s:], want[:, s:])


# --------------------------------------------------------------------------- training

SEQ, BATCH, LR = 32, 2, 1e-2


def _train_data(device: str):
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return ids.to(device), shift_labels(ids).to(device)


def _initial_state():
    torch.manual_seed(0)
    return LlamaForCausalLM("tiny", mesh=Mesh()).full_state_dict()


def _one_step(model, m: Mesh, ids, labels) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = causal_lm_loss(model(ids), labels, m)
    out.loss.backward()
    if m.world_size > 1:
        sync_gradients(model, m)
    opt.step()
    return float(out.value)


def train_worker(device: str, degrees: dict, strategy: str):
    """One AdamW step of the tiny model on this rank's shard; loss and the gathered state on CPU."""
    _use(device)
    m = mesh(**degrees)
    model = LlamaForCausalLM("tiny", mesh=m, strategy=strategy, device=device)
    model.load_full_state_dict(_initial_state())
    ids, labels = _train_data(device)
    ids_l = seqpar.shard(ids, 1, mesh=m)
    labels_l = seqpar.shard(labels, 1, mesh=m, pad_value=-100)
    loss = _one_step(model, m, ids_l, labels_l)
    state = model.full_state_dict()
    return {"loss": loss, "devices": sorted({t.device.type for t in state.values()}),
            "state": {k: t.cpu() for k, t in state.items()}}


@pytest.mark.parametrize("degrees,strategy", [({"tp": 2}, "ring"), ({"sp": 2}, "ring")], ids=["tp2", "sp2-ring"])
def test_training_step_equals_one_process(pool, degrees, strategy):
    model = LlamaForCausalLM("tiny", mesh=Mesh(), device=DEVICE)
    model.load_full_state_dict(_initial_state())
    want_loss = _one_step(model, Mesh(), *_train_data(DEVICE))
    want = {k: t.cpu() for k, t in model.full_state_dict().items()}
    for r in _run(pool, 2, train_worker, DEVICE, degrees, strategy):
        assert r["devices"] == [torch.device(DEVICE).type]
        assert r["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
        for name, ref in want.items():
            assert torch.allclose(r["state"][name], ref, atol=2e-5, rtol=1e-4), name


# --------------------------------------------------------------------------- the fused merge


@pytest.mark.skipif(not ON_CUDA, reason="the fused Triton merge runs on CUDA tensors")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_merge_runs_and_equals_pytorch(dtype, monkeypatch):
    """On the GPU the ring's merge is one Triton kernel: it must compile, run and equal the PyTorch merge."""
    pytest.importorskip("triton")
    from seqpar.core import fused_merge

    g = torch.Generator().manual_seed(0)
    acc = torch.randn(2, 300, 8, 128, generator=g).to(DEVICE)
    acc_lse = torch.randn(2, 8, 300, generator=g).to(DEVICE)
    acc_lse[0, 0, :5] = float("-inf")
    out = torch.randn(2, 300, 8, 128, generator=g).to(DEVICE, dtype)
    lse = torch.randn(2, 8, 300, generator=g).to(DEVICE)
    lse[0, 0, :3] = float("-inf")
    want_acc, want_lse = acc.clone(), acc_lse.clone()
    monkeypatch.setenv("SEQPAR_FUSED_MERGE", "0")
    kernels.merge_into(want_acc, want_lse, out, lse)
    monkeypatch.delenv("SEQPAR_FUSED_MERGE")
    assert fused_merge.merge_into(acc, acc_lse, out, lse), "the fused merge did not run (see the warning)"
    torch.cuda.synchronize()
    torch.testing.assert_close(acc, want_acc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse, want_lse, atol=1e-5, rtol=1e-5)
