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
    cases = COMPILE_CASES[:2] if strategy == "usp" else COMPILE_CASES  # usp: 4 ranks, the costliest trace
    for per_rank in pool(world).run(compiled_vs_eager, strategy, cases, degrees, timeout=300):
        for case, res in zip(cases, per_rank):
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


def test_plans_are_built_once_and_reused(monkeypatch):
    """The second call with the same layout, length, mask and packing (layer 2..L of a step) builds nothing."""
    from seqpar.attention import plans

    built = []
    for name in ("block_tasks", "varlen_calls"):
        real = getattr(plans, name)
        monkeypatch.setattr(plans, name, lambda *a, real=real, name=name, **kw: built.append(name) or real(*a, **kw))
    plans.clear_plans()
    q = torch.randn(1, 64, 4, 8, requires_grad=True)
    one = seqpar.Mesh()
    for cu in ([0, 14, 40, 64], torch.tensor([0, 14, 40, 64])):
        for _ in range(3):
            seqpar.attention(q, q, q, causal=True, mesh=one, cu_seqlens=cu, window=(9, 0)).sum().backward()
    assert built == ["block_tasks"]  # one plan, one block, for six calls (a list and a tensor of the same packing)
    seqpar.attention(q, q, q, causal=True, mesh=one, cu_seqlens=[0, 20, 64], window=(9, 0))
    assert built == ["block_tasks"] * 2  # another packing: another plan
