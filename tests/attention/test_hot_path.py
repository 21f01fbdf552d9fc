"""The hot path: no host reads of tensor data after planning, plans built once, and torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.attention import REGISTRY
from seqpar.core.strategies import SP_STRATEGIES
from tests.attention.cases import compiled_vs_eager, no_host_reads_after_planning, train_llama_compiled

CU = [0, 13, 40, 64]
# causal; packed documents; a sliding window; both (the shape is GQA: 4 q heads over 2 kv heads)
CASES = [(True, None, None), (False, None, None), (True, CU, None), (False, None, (5, 2)), (True, CU, (6, 0))]
RUNS = [("ring", 2, {}), ("ulysses", 2, {}), ("allgather", 2, {}), ("ring_qk_av", 2, {}),
        ("usp", 4, {"ulysses": 2, "ring": 2})]


def test_registry_holds_exactly_the_strategies_the_planner_knows():
    assert sorted(REGISTRY) == sorted(SP_STRATEGIES) and seqpar.STRATEGIES == SP_STRATEGIES


@pytest.mark.parametrize("strategy,world,degrees", RUNS, ids=[r[0] for r in RUNS])
def test_no_host_reads_in_forward_or_backward(pool, strategy, world, degrees):
    """After the first call built the plan, forward and backward read no tensor back to the host."""
    for reads in pool(world).run(no_host_reads_after_planning, strategy, CASES, degrees):
        assert reads == []


COMPILE_CASES = [(True, None, None), (True, CU, (6, 0)), (False, None, (5, 2))]


@pytest.mark.parametrize("strategy,world,degrees", RUNS, ids=[r[0] for r in RUNS])
def test_compiled_fullgraph_equals_eager(pool, strategy, world, degrees):
    """torch.compile(fullgraph=True) traces seqpar.attention (plain causal, packed + windowed, windowed) and
    gives exactly eager's output and gradients: the same cores run, as custom ops."""
    for per_rank in pool(world).run(compiled_vs_eager, strategy, COMPILE_CASES, degrees, timeout=300):
        for case, res in zip(COMPILE_CASES, per_rank):
            assert res == {"diff": 0.0, "breaks": 0}, (case, res)


def test_compiled_with_inductor(pool):
    for per_rank in pool(2).run(compiled_vs_eager, "allgather", [(True, CU, None)], {}, "inductor", timeout=300):
        assert per_rank == [{"diff": 0.0, "breaks": 0}]


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_compiled_llama_blocks_train_like_eager(pool, strategy):
    """Three AdamW steps of the seqpar Llama with every decoder block compiled (fullgraph) equal eager."""
    eager = pool(2).run(train_llama_compiled, strategy, False, timeout=300)
    compiled = pool(2).run(train_llama_compiled, strategy, True, timeout=300)
    for e, c in zip(eager, compiled):
        assert c["losses"] == e["losses"]
        for name, t in e["state"].items():
            assert torch.equal(c["state"][name], t), name
