"""No hangs, clear errors: debug-mode agreement checks, NaN/Inf checks, determinism, a dead rank."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

import seqpar
from seqpar.launch.pool import RemoteException
from tests.attention.cases import run_attention, run_sharded
from tests.helpers import mesh


def mismatched_shapes(bad_rank: int):
    m = mesh()
    seqpar.set_debug(True)
    try:
        n = 6 if m.rank("sp") == bad_rank else 8  # one rank got a different shard length
        q, k = torch.randn(1, n, 4, 8), torch.randn(1, n, 2, 8)
        seqpar.attention(q, k, k, causal=True, strategy="ring", layout="contiguous")
    except seqpar.ShapeError as e:
        return str(e)
    finally:
        seqpar.set_debug(False)
    return None


def test_debug_mode_names_the_rank_that_differs_instead_of_hanging(pool):
    msgs = pool(4).run(mismatched_shapes, 2, timeout=60)
    assert all(m is not None and "ranks disagree before attention" in m and "rank 2 runs" in m for m in msgs), msgs
    assert all("(1, 6, 4, 8)" in m and "(1, 8, 4, 8)" in m for m in msgs)


def nan_in_inputs(rank_with_nan: int, tensor: str):
    m = mesh()
    seqpar.set_check_finite(True)
    try:
        q, k, v = torch.randn(1, 8, 4, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
        if m.rank("sp") == rank_with_nan:
            {"q": q, "k": k, "v": v}[tensor][0, 3, 1, 0] = float("nan")
        seqpar.attention(q, k, v, causal=True, name="layers.7.attn")
    finally:
        seqpar.set_check_finite(False)
    return "ok"


@pytest.mark.parametrize("tensor", ["q", "v"])
def test_nan_names_tensor_layer_and_rank_on_every_rank(pool, tensor):
    res = pool(4).run(nan_in_inputs, 1, tensor, return_exceptions=True)
    for r in res:  # every rank fails the same way: none is left waiting in a collective
        assert isinstance(r, RemoteException) and r.type_name == "NumericsError", r
        assert f"NaN in {tensor} of attention layers.7.attn (ring) on rank 1" in r.message


def nan_in_gradient():
    mesh()
    seqpar.set_check_finite(True)
    try:
        q = torch.randn(1, 8, 4, 8, requires_grad=True)
        k = torch.randn(1, 8, 2, 8)
        out = seqpar.attention(q, k, k, causal=True, name="layers.0.attn", strategy="ulysses")
        out.backward(torch.full_like(out, float("inf")))
    except seqpar.NumericsError as e:
        return str(e)
    finally:
        seqpar.set_check_finite(False)


def test_inf_gradient_is_reported(pool):
    for msg in pool(2).run(nan_in_gradient):
        assert msg and "Inf in the output gradient of attention layers.0.attn (ulysses) on rank" in msg


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses", "usp", "ring_qk_av"])
def test_padding_rows_are_zero_never_nan(pool, strategy):
    degrees = {"ulysses": 2, "ring": 2} if strategy == "usp" else {}
    res = pool(4).run(run_sharded, strategy, "zigzag", True, (1, 37, 4, 2, 8), degrees=degrees, pad=True)
    for key in ("out", "dq", "dk", "dv"):
        assert torch.isfinite(res[0][key]).all(), key


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "usp", "allgather", "ring_qk_av"])
def test_bitwise_deterministic_run_to_run(pool, strategy):
    if strategy == "usp":
        a = pool(4).run(run_sharded, "usp", "zigzag", True, (1, 64, 4, 2, 8), degrees={"ulysses": 2, "ring": 2})
        b = pool(4).run(run_sharded, "usp", "zigzag", True, (1, 64, 4, 2, 8), degrees={"ulysses": 2, "ring": 2})
    else:
        a = pool(4).run(run_attention, strategy, "zigzag", True, "float32", (1, 64, 4, 2, 8))
        b = pool(4).run(run_attention, strategy, "zigzag", True, "float32", (1, 64, 4, 2, 8))
    for ra, rb in zip(a, b):
        for key in ("out", "dq", "dk", "dv"):
            assert torch.equal(ra[key], rb[key]), key


def _rank_main(rank: int, world: int, port: int, results) -> None:
    """A 4-rank training run (own processes, not the pool) in which rank 2 dies during step 3."""
    import datetime

    import torch.distributed as dist

    from seqpar.train.trainer import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)
    calls = [0]
    if rank == 2:
        real = torch.Tensor.backward

        def dying_backward(self, *a, **k):
            calls[0] += 1
            if calls[0] == 3:
                os._exit(17)  # killed in the middle of training step 3
            return real(self, *a, **k)

        torch.Tensor.backward = dying_backward
    t0 = time.time()
    try:
        train(TrainConfig.from_dict({"model": "tiny", "seq_len": 64, "micro_batch": 2, "steps": 5,
                                     "data": {"kind": "recall", "pairs": 4}, "timeout": 20}))
        results.put((rank, "finished", time.time() - t0))
    except seqpar.CommError as e:
        results.put((rank, str(e), time.time() - t0))


@pytest.mark.slow
def test_dead_rank_fails_the_others_with_the_step_named(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 4, port, results)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks still running after the deadline: a hang"
    assert procs[2].exitcode == 17
    got = {}
    while not results.empty():
        rank, msg, elapsed = results.get()
        got[rank] = (msg, elapsed)
    assert sorted(got) == [0, 1, 3]
    for rank, (msg, elapsed) in got.items():
        assert f"training step 3 failed on rank {rank}" in msg, msg
        assert elapsed < 60
