"""A reusable pool of torch.distributed worker processes, one per rank.

Spawning N processes, importing torch in each and rendezvousing a process
group costs seconds; a suite of hundreds of distributed tests cannot pay that
per test. A WorkerPool starts its ranks once, then runs tasks on them for about
a millisecond of pipe traffic each. Design, and why:

* Ranks are forked by multiprocessing's ``forkserver``, which preloads torch
  (and pytest under pytest: ranks re-import the main module). Start-up skips
  the ~1 s torch import, yet we never fork a parent whose OpenMP/gloo threads
  already run, which can deadlock the child on a lock held by a lost thread.
* The parent hosts the rendezvous TCPStore on 127.0.0.1, port 0 (the OS picks
  a free port, no race); it never joins or initialises a process group. Ranks
  call ``init_process_group(backend, timeout=...)`` once, so a collective a
  peer never joins errors out instead of hanging.
* A task ``(fn, args, kwargs)`` is serialized once with ``torch.save`` (tensors
  travel as raw bytes, exactly) and written to one Pipe per rank, prefixed with
  the parent's ``sys.path`` so that what the parent imports, ranks import too.
  pickle stores functions by reference: ``fn`` must be a module-level function
  of an importable module (tests are a package for this); lambdas and nested
  functions raise TypeError. ``timeout`` and ``return_exceptions`` are taken by
  ``run``. Nothing else happens per task: no seeding, no barrier.

Teardown rules, so that a broken test never hangs the suite:

* every rank raised (e.g. input validation before any collective): one
  all_reduce checks that the group still works (a gloo timeout closes its
  connections for good); if so WorkerError is raised and the pool kept;
* some ranks raised: the others may wait in a collective the failed ranks never
  reach; they get ``grace`` seconds, then the pool is killed;
* a rank died (segfault, SIGKILL, ``os._exit``) or the task overran its timeout:
  the pool is killed at once. ``multiprocessing.connection.wait`` watches the
  result pipes and process sentinels together, so this is noticed at once.

A killed pool is ``closed``; ``get_pool`` then builds a fresh one. Rank output
goes where the parent's fds 1/2 pointed when the forkserver started (under
pytest: its capture file, so it shows in the test running at the time). As with
any spawn/forkserver start, a main script needs ``if __name__ == "__main__":``.
Not thread-safe.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WorkerPool", "WorkerError", "RemoteException", "get_pool", "shutdown_pools", "run_on_ranks",
           "leave_job"]

_HOST = "127.0.0.1"
_SHUTDOWN = b""  # an empty message asks a rank to leave its loop


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes | memoryview) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


class RemoteException:
    """An exception raised by ``fn`` on one rank, carried as text (the
    exception object itself may not pickle, or its class may not import)."""

    def __init__(self, rank: int, type_name: str, message: str, traceback: str) -> None:
        self.rank, self.type_name, self.message, self.traceback = rank, type_name, message, traceback

    def __repr__(self) -> str:
        return f"RemoteException(rank={self.rank}, {self.type_name}: {self.message!r})"


class WorkerError(RuntimeError):
    """A task failed in the pool: ranks raised, died, or timed out.
    ``failures`` maps rank -> RemoteException for the ranks that raised."""

    def __init__(self, message: str, failures: dict[int, RemoteException] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


def _error_reply(exc: BaseException, prefix: str = "") -> bytes:
    return _dumps(("err", (type(exc).__name__, prefix + str(exc), traceback.format_exc())))


def _worker_main(rank: int, world_size: int, port: int, conn: Any, timeout: float,
                 backend: str, threads: int) -> None:
    # Ctrl-C reaches the whole process group: let the parent handle it and kill us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR=_HOST, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if sys.platform == "linux":  # all ranks are local; do not depend on hostname resolution
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        td = timedelta(seconds=timeout)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=td)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
        conn.send_bytes(_dumps(("ok", None)))
    except Exception as exc:
        conn.send_bytes(_error_reply(exc))
        try:  # stay alive until the parent kills us: exiting now would read as a crash
            conn.recv_bytes()
        except EOFError:
            pass
        return
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # parent is gone
            break
        if data == _SHUTDOWN:
            break
        try:
            n = int.from_bytes(data[:4], "big")
            path = data[4:4 + n].decode("utf-8", "surrogateescape").split("\0")
            if sys.path != path:  # before unpickling: fn's module must be importable
                sys.path[:] = path
            fn, args, kwargs = _loads(memoryview(data)[4 + n:])
            result = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too: report it, keep serving
            reply = _error_reply(exc)
        else:
            try:
                reply = _dumps(("ok", result))
            except Exception as exc:
                reply = _error_reply(exc, "cannot serialize the result: ")
        conn.send_bytes(reply)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def _check_group() -> int:
    ones = torch.ones(1)
    dist.all_reduce(ones)
    return int(ones.item())


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _format_errors(errors: dict[int, RemoteException]) -> str:
    groups: dict[str, list[int]] = {}  # identical tracebacks are printed once
    for rank in sorted(errors):
        groups.setdefault(errors[rank].traceback, []).append(rank)
    parts = []
    for tb, ranks in groups.items():
        e = errors[ranks[0]]
        parts.append(f"{_ranks(ranks)} raised {e.type_name}: {e.message}\n"
                     f"--- remote traceback ({_ranks(ranks)}) ---\n{tb.rstrip()}")
    return "\n".join(parts)


class WorkerPool:
    """``world_size`` worker processes in one gloo process group; see module docs."""

    def __init__(self, world_size: int, *, timeout: float = 120.0, backend: str = "gloo",
                 threads_per_rank: int = 1, grace: float = 5.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.world_size, self.timeout, self.grace = world_size, timeout, grace
        self._owner = os.getpid()  # a forked copy of this object must not kill our workers
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._closed = False
        ctx = mp.get_context("forkserver")
        # Whatever every rank would import anyway is imported once, in the server.
        # Under pytest that includes pytest: ranks re-import the main module.
        test_mods = [m for m in ("pytest", "hypothesis") if m in sys.modules]
        ctx.set_forkserver_preload(["torch", "torch.distributed", "seqpar.launch.pool", *test_mods])
        self._store: Any = dist.TCPStore(_HOST, 0, None, True, timedelta(seconds=timeout),
                                         wait_for_workers=False)
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"seqpar-rank{rank}", daemon=True,
                                   args=(rank, world_size, self._store.port, child_end,
                                         timeout, backend, threads_per_rank))
                proc.start()
                child_end.close()  # else our copy would hide the EOF of a dead worker
                self._procs.append(proc)
                self._conns.append(parent_end)
            results, errors = self._gather("pool start-up", timeout)
            if errors:
                raise WorkerError(f"process group init failed:\n{_format_errors(errors)}", errors)
        except BaseException:
            self._kill()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
            return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; results in rank order.

        ``timeout`` defaults to the pool's timeout plus ``grace``, so that a
        stuck collective reports gloo's own error (with the rank's traceback)
        before the parent gives up. With ``return_exceptions=True`` a rank that
        raised yields a RemoteException instead (deaths and timeouts still
        raise WorkerError)."""
        name = getattr(fn, "__qualname__", repr(fn))
        results, errors = self._submit(fn, args, kwargs, timeout)
        if errors:
            # Some ranks returned: they may have left collectives unmatched. All
            # raised: the group may still be broken (a gloo timeout closes its
            # connections for good), so one all_reduce must pass to keep it.
            if len(errors) < self.world_size or not self._group_ok():
                self._kill()
            if not return_exceptions:
                state = "pool torn down" if self._closed else "pool kept"
                raise WorkerError(f"task {name} failed ({state}):\n{_format_errors(errors)}", errors)
        return [errors[r] if r in errors else results[r] for r in range(self.world_size)]

    def _submit(self, fn: Callable[..., Any], args: tuple, kwargs: dict,
                timeout: float | None) -> tuple[dict[int, Any], dict[int, RemoteException]]:
        if self._closed:
            raise WorkerError(f"pool of {self.world_size} is closed; use get_pool() for a fresh one")
        name = getattr(fn, "__qualname__", repr(fn))
        if "<locals>" in name or "<lambda>" in name:
            raise TypeError(f"{name} is not a module-level function; tasks are pickled by "
                            "reference, so ranks can only import module-level functions")
        try:
            body = _dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"cannot serialize task {name}: {exc} (fn must be a module-level "
                            "function, args and kwargs must pickle)") from exc
        path = "\0".join(sys.path).encode("utf-8", "surrogateescape")
        msg = len(path).to_bytes(4, "big") + path + body
        try:
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(msg)
                except OSError:
                    self._raise_dead([rank], name, {})
            return self._gather(name, self.timeout + self.grace if timeout is None else timeout)
        except BaseException:  # WorkerError after a death/timeout, or Ctrl-C mid-task
            self._kill()
            raise

    def _group_ok(self) -> bool:
        try:
            results, errors = self._submit(_check_group, (), {}, self.grace)
        except WorkerError:
            return False
        return not errors and all(v == self.world_size for v in results.values())

    def _gather(self, name: str, timeout: float) -> tuple[dict[int, Any], dict[int, RemoteException]]:
        """Collect one reply per rank; raise WorkerError on death or timeout."""
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        errors: dict[int, RemoteException] = {}
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = sorted(pending.values())
                if errors:
                    raise WorkerError(
                        f"task {name} failed and {_ranks(stuck)} did not finish within the "
                        f"{self.grace:g} s grace period (probably blocked in a collective); pool "
                        f"torn down:\n{_format_errors(errors)}", errors)
                raise WorkerError(f"task {name} timed out after {timeout:g} s on "
                                  f"{_ranks(stuck)}; pool torn down", errors)
            # pipes before sentinels: a rank's last words (e.g. its init error) outrank its exit
            ready_list = wait([*pending, *sentinels], timeout=left)
            for ready in sorted(ready_list, key=lambda obj: obj in sentinels):
                if ready in sentinels:
                    self._raise_dead([sentinels[ready]], name, errors)
                if ready not in pending:
                    continue
                rank = pending.pop(ready)
                try:
                    data = self._conns[rank].recv_bytes()  # ready itself, typed: wait() returns any waitable
                except (EOFError, OSError):
                    self._raise_dead([rank], name, errors)
                try:
                    status, value = _loads(data)
                except Exception as exc:  # e.g. a result class the parent cannot import
                    status, value = "err", (type(exc).__name__, f"cannot load the result in the "
                                            f"parent: {exc}", traceback.format_exc())
                if status == "ok":
                    results[rank] = value
                else:
                    errors[rank] = RemoteException(rank, *value)
                    # the others get a short grace period, not the full task timeout
                    deadline = min(deadline, time.monotonic() + self.grace)
        return results, errors

    def _raise_dead(self, ranks: list[int], name: str, errors: dict[int, RemoteException]) -> None:
        for rank in ranks:
            self._procs[rank].join(1.0)  # a closed pipe can precede the exit status by a moment
        dead = sorted(set(ranks) | {r for r, p in enumerate(self._procs) if p.exitcode is not None})
        why = "; ".join(f"rank {r} {_describe_exit(self._procs[r].exitcode)}" for r in dead)
        extra = f"\n{_format_errors(errors)}" if errors else ""
        raise WorkerError(f"task {name}: {why}; pool of {self.world_size} torn down{extra}", errors)

    def _kill(self) -> None:
        """Kill and reap every rank (no zombies), then drop the pipes and the store."""
        if os.getpid() != self._owner:
            return
        self._closed = True  # first: get_pool must never hand out a half-killed pool
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self._procs:
            proc.join(10.0)
        for conn in self._conns:
            conn.close()
        self._store = None

    def close(self) -> None:
        """Ask every rank to leave the process group and exit; kill stragglers."""
        if self._closed or os.getpid() != self._owner:
            return
        for conn in self._conns:
            try:
                conn.send_bytes(_SHUTDOWN)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world_size: int) -> WorkerPool:
    """The process-wide pool for ``world_size`` ranks, rebuilt if it was torn down."""
    pool = _POOLS.get(world_size)
    if pool is not None and any(p.exitcode is not None for p in pool._procs):
        pool._kill()  # a rank died while idle (OOM killer, stray signal): do not hand it out
    if pool is None or pool.closed:
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


def shutdown_pools() -> None:
    """Close every cached pool (also runs at interpreter exit)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


atexit.register(shutdown_pools)


def leave_job() -> None:
    """Under torchrun, leave the job together: barrier, then destroy the process group.

    A rank that exits while a peer still holds the group makes gloo abort that peer (SIGABRT).
    Nothing to do without a process group.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, nproc: int, *args: Any, timeout: float | None = None, **kwargs: Any) -> list:
    """``fn(*args, **kwargs)`` on every rank; returns every rank's result, in rank order.

    Under torchrun (``WORLD_SIZE`` set) this process is one rank: it takes ``cuda:LOCAL_RANK`` where
    CUDA is available, runs ``fn`` (which sets up the process group, e.g. through ``seqpar.init``),
    gathers the results and leaves the job with the others (:func:`leave_job`).  Otherwise a
    :class:`WorkerPool` of ``nproc`` local ranks (gloo) runs it: ``fn`` must then be a module-level
    function of an importable module.
    Communication: under torchrun, one ``all_gather_object`` of the results.
    """
    if "WORLD_SIZE" not in os.environ:
        # no timeout given: the pool's own default
        with WorkerPool(nproc) if timeout is None else WorkerPool(nproc, timeout=timeout) as pool:
            return pool.run(fn, *args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    result = fn(*args, **kwargs)
    if not dist.is_initialized():
        return [result]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    leave_job()
    return gathered
