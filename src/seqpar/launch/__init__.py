"""Running a function on many ranks: a reusable pool of local gloo ranks, and torchrun's ranks.

* :class:`WorkerPool` / :func:`get_pool`: local ranks started once and reused across tasks (the test
  suite and ``seqpar demo`` run on it; a task costs about half a millisecond).
* :func:`run_on_ranks`: one call that runs on torchrun's ranks when launched by torchrun, else on a
  local pool; :func:`leave_job` makes torchrun's ranks leave together.
"""
from .pool import RemoteException, WorkerError, WorkerPool, get_pool, leave_job, run_on_ranks, shutdown_pools

__all__ = ["WorkerPool", "WorkerError", "RemoteException", "get_pool", "shutdown_pools", "run_on_ranks", "leave_job"]
