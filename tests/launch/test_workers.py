"""The worker pool every distributed test runs on: ordering, collectives,
exact transport, and the failure/teardown rules (see seqpar.launch.pool)."""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import threading
import time
import uuid

import pytest
import torch
import torch.distributed as dist

from seqpar.launch.pool import RemoteException, WorkerError, WorkerPool

# --- tasks: module-level so the ranks can import them by reference -----------


def whoami(tag: str, *, scale: int = 1) -> dict:
    return {
        "rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(),
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]),
        "threads": torch.get_num_threads(), "backend": dist.get_backend(), "tag": tag * scale,
    }


def all_reduce_rank() -> float:
    t = torch.tensor([dist.get_rank() + 1.0], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def echo(x: object) -> object:
    return x


def seeded_randn(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(1234 + dist.get_rank())
    return torch.randn(shape)


def noop() -> None:
    return None


def raise_everywhere() -> None:
    raise ValueError(f"bad input on rank {dist.get_rank()}")


def raise_on_rank1_while_rank0_waits() -> None:
    if dist.get_rank() == 1:
        raise KeyError("rank one is broken")
    dist.all_reduce(torch.zeros(1))  # never matched: rank 1 is gone


def rank_or_raise() -> int:
    if dist.get_rank() == 1:
        raise RuntimeError("only rank 1 fails")
    return dist.get_rank()


def die_on_rank1(how: str) -> int:
    if dist.get_rank() == 1:
        if how == "exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            ctypes.string_at(0)  # segfault
    return dist.get_rank()


def sleep_on_rank1(seconds: float) -> int:
    if dist.get_rank() == 1:
        time.sleep(seconds)
    return dist.get_rank()


def unpicklable_result() -> object:
    return threading.Lock()


# --- helpers -----------------------------------------------------------------


def assert_gone(pids: list[int]) -> None:
    """Killed ranks are reaped, not zombies: their pids no longer exist."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (b.dtype, b.shape, b.stride(), b.requires_grad)
    as_bytes = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(a), as_bytes(b))


# --- tests -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_results_in_rank_order(pool, n):
    out = pool(n).run(whoami, "ab", scale=2)
    assert [o["rank"] for o in out] == list(range(n))
    for r, o in enumerate(out):
        assert o["world"] == n and o["env"] == (str(r), str(n), str(r))
        assert (o["threads"], o["backend"], o["tag"]) == (1, "gloo", "abab")
    pids = {o["pid"] for o in out}
    assert len(pids) == n and os.getpid() not in pids
    assert not dist.is_initialized()  # the parent only hosts the store


def test_pool_is_reused(pool):
    p = pool(2)
    first = [o["pid"] for o in p.run(whoami, "x")]
    assert pool(2) is p and [o["pid"] for o in p.run(whoami, "y")] == first == p.pids


@pytest.mark.parametrize("n", [2, 4])
def test_all_reduce(pool, n):
    assert pool(n).run(all_reduce_rank) == [n * (n + 1) / 2] * n


def test_tensors_round_trip_exactly(pool):
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45, 3.0])
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {
        "special": special, "bf16": special.bfloat16(), "f16": special.half(),
        "int64": torch.tensor([torch.iinfo(torch.int64).min, -1, torch.iinfo(torch.int64).max]),
        "bool": torch.tensor([True, False]), "u8": torch.arange(256, dtype=torch.uint8),
        "complex": torch.randn(3, dtype=torch.complex64), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3), "transposed": base.t(), "slice": base[1:, ::2],
        "grad": torch.randn(2, 2, requires_grad=True),
    }
    for out in pool(2).run(echo, tensors):
        assert out.keys() == tensors.keys()
        for key, t in tensors.items():
            assert_bitwise_equal(out[key], t)
    for r, t in enumerate(pool(2).run(seeded_randn, (3, 5))):
        torch.manual_seed(1234 + r)
        assert_bitwise_equal(t, torch.randn(3, 5))


def test_exception_on_all_ranks_keeps_pool(pool):
    p = pool(2)
    pids = p.pids
    with pytest.raises(WorkerError) as info:
        p.run(raise_everywhere)
    msg = str(info.value)
    for text in ("ValueError", "bad input on rank 0", "bad input on rank 1", "raise_everywhere", "Traceback"):
        assert text in msg
    assert sorted(info.value.failures) == [0, 1]
    assert not p.closed and pool(2) is p and p.pids == pids
    assert p.run(all_reduce_rank) == [3.0, 3.0]


def test_exception_on_one_rank_tears_down_within_grace(pool):
    p = pool(2)
    pids = p.pids
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        p.run(raise_on_rank1_while_rank0_waits)
    assert time.monotonic() - start < p.grace + 5
    msg = str(info.value)
    for text in ("rank 1 raised KeyError", "rank one is broken", "rank 0 did not finish", "torn down"):
        assert text in msg
    assert p.closed
    assert_gone(pids)
    fresh = pool(2)
    assert fresh is not p and fresh.run(all_reduce_rank) == [3.0, 3.0]


@pytest.mark.parametrize("how, expected", [
    ("exit", "rank 1 exited with code 3"),
    ("sigkill", "rank 1 was killed by signal SIGKILL"),
    ("segfault", "rank 1 was killed by signal SIGSEGV"),
])
def test_worker_death(pool, how, expected):
    p = pool(2)
    pids = p.pids
    start = time.monotonic()
    with pytest.raises(WorkerError, match=expected):
        p.run(die_on_rank1, how)
    assert time.monotonic() - start < 5
    assert p.closed
    assert_gone(pids)
    assert pool(2).run(rank_or_raise, return_exceptions=True)[0] == 0


def test_timeout(pool):
    p = pool(2)
    pids = p.pids
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"timed out after 0.5 s on rank 1;"):
        p.run(sleep_on_rank1, 60.0, timeout=0.5)
    assert time.monotonic() - start < 3
    assert p.closed
    assert_gone(pids)
    with pytest.raises(WorkerError, match="closed"):
        p.run(noop)
    assert pool(2).run(sleep_on_rank1, 0.0) == [0, 1]


def test_return_exceptions(pool):
    p = pool(2)
    out = p.run(raise_everywhere, return_exceptions=True)
    for r, exc in enumerate(out):
        assert isinstance(exc, RemoteException) and exc.rank == r
        assert (exc.type_name, exc.message) == ("ValueError", f"bad input on rank {r}")
        assert "raise_everywhere" in exc.traceback
    assert not p.closed  # every rank raised: pool kept
    out = p.run(rank_or_raise, return_exceptions=True)
    assert out[0] == 0 and isinstance(out[1], RemoteException)
    assert out[1].message == "only rank 1 fails"
    assert p.closed  # mixed outcome: pool torn down


def test_unserializable_tasks_are_rejected_before_sending(pool):
    p = pool(2)

    def local() -> None:
        return None

    for fn in (local, lambda: None):
        with pytest.raises(TypeError, match="module-level"):
            p.run(fn)
    with pytest.raises(TypeError, match="cannot serialize"):
        p.run(echo, threading.Lock())
    with pytest.raises(WorkerError, match="cannot serialize the result: cannot pickle"):
        p.run(unpicklable_result)  # fails on every rank: pool kept
    assert not p.closed and p.run(noop) == [None, None]


def test_parent_sys_path_reaches_running_pool(pool, tmp_path, monkeypatch):
    p = pool(2)  # started before tmp_path joined sys.path
    name = f"seqpar_tmp_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "import torch.distributed as dist\n\ndef hello():\n    return f'hi {dist.get_rank()}'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    assert p.run(module.hello) == ["hi 0", "hi 1"]


def test_context_manager_and_validation():
    with pytest.raises(ValueError):
        WorkerPool(0)
    with WorkerPool(2, threads_per_rank=2) as p:
        assert [o["threads"] for o in p.run(whoami, "t")] == [2, 2]
        pids = p.pids
    assert p.closed
    assert_gone(pids)


def test_per_task_overhead_is_small(pool):
    p = pool(4)
    p.run(noop)
    start = time.perf_counter()
    for _ in range(50):
        p.run(noop)
    per_task = (time.perf_counter() - start) / 50
    assert per_task < 0.05, f"{per_task * 1e3:.1f} ms per no-op task"  # ~1 ms expected


def mismatched_collectives() -> None:
    t = torch.zeros(4)
    if dist.get_rank() == 0:
        dist.all_reduce(t)
    else:
        dist.broadcast(t, 0)


def test_collective_timeout_on_all_ranks_tears_down():
    # Every rank raises (gloo's timeout), yet the group is dead: the pool must not be kept.
    p = WorkerPool(2, timeout=1.0)
    pids = p.pids
    with pytest.raises(WorkerError, match=r"(?s)pool torn down.*rank 0 raised RuntimeError.*Timed out"):
        p.run(mismatched_collectives)
    assert p.closed
    assert_gone(pids)


def test_start_failure_is_reported():
    with pytest.raises(WorkerError, match="process group init failed"):
        WorkerPool(2, backend="no-such-backend")


def test_get_pool_replaces_a_pool_whose_rank_died_while_idle(pool):
    p = pool(2)
    os.kill(p.pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the forkserver has reaped it
        try:
            os.kill(p.pids[1], 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    fresh = pool(2)
    assert fresh is not p and p.closed
    assert fresh.run(all_reduce_rank) == [3.0, 3.0]
