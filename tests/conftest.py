"""Shared pytest setup: the multi-rank worker pool fixture and hypothesis profiles."""
from __future__ import annotations

from typing import Callable

import pytest
from hypothesis import settings

from seqpar.launch.pool import WorkerPool, get_pool, shutdown_pools

# Distributed hypothesis examples cost milliseconds each and vary a lot on a
# loaded 2-core CI box: fewer examples, and no per-example deadline.
settings.register_profile("ci", max_examples=20, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def pool() -> Callable[[int], WorkerPool]:
    """``get_pool``: ``pool(4).run(fn, ...)`` runs ``fn`` on the cached 4-rank pool.

    Function-scoped but free: the pools themselves are process-wide and
    reused; one that a failing test tore down is rebuilt on the next call.
    ``fn`` must be a module-level function (tasks are pickled by reference).
    """
    return get_pool


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Close workers while pytest still owns the terminal; atexit is the backstop.
    shutdown_pools()
