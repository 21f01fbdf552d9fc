"""Norms on sequence shards: sync_sequence_parallel_grads gives the full-sequence weight gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import seqpar
from seqpar import tp
from tests.helpers import mesh
from tests.tp import CONFIG_IDS, CONFIGS, assemble, err, full_randn, info, shard_seq, sum_over_sp

B, S, H = 2, 8, 6


def _full_norm(kind: str) -> nn.Module:
    norm = nn.LayerNorm(H, dtype=torch.float64) if kind == "layer" else nn.RMSNorm(H, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():  # non-trivial affine parameters, so every gradient term matters
        for i, p in enumerate(norm.parameters()):
            p.copy_(full_randn(H, seed=20 + i))
    return norm


def w_norm(tp_degree: int, kind: str, sequence_parallel: bool):
    m = mesh(tp=tp_degree)
    inf = info(m)
    full = _full_norm(kind)
    norm = tp.LayerNorm(H, sequence_parallel=sequence_parallel, dtype=torch.float64) if kind == "layer" else \
        tp.RMSNorm(H, eps=1e-6, sequence_parallel=sequence_parallel, dtype=torch.float64)
    norm.load_state_dict(full.state_dict())
    x, dy = full_randn(B, S, H, seed=1), full_randn(B, S, H, seed=2)
    xs = shard_seq(x, inf, sequence_parallel).requires_grad_()
    with seqpar.stats.track() as fwd:
        y = norm(xs)
        y.backward(shard_seq(dy, inf, sequence_parallel))
    unsynced = {n: p.grad.clone() for n, p in norm.named_parameters()}
    with seqpar.stats.track() as st:
        synced = tp.sync_sequence_parallel_grads(norm, m)
    grads = {n: p.grad for n, p in norm.named_parameters()}
    sum_over_sp(list(grads.values()) + list(unsynced.values()), m)
    return {"info": inf, "y": y.detach(), "dx": xs.grad, "grads": grads, "unsynced": unsynced,
            "synced": synced, "sync_calls": dict(st.calls), "fwd_calls": dict(fwd.calls)}


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "replicated"])
def test_norm_grads_need_the_tp_sync(pool, world, tp_degree, kind, sequence_parallel):
    res = pool(world).run(w_norm, tp_degree, kind, sequence_parallel)
    norm = _full_norm(kind)
    x = full_randn(B, S, H, seed=1).requires_grad_()
    y = norm(x)
    y.backward(full_randn(B, S, H, seed=2))
    assert err(assemble(res, "y", sequence_parallel), y) < 1e-12
    assert err(assemble(res, "dx", sequence_parallel), x.grad) < 1e-12
    n_params = 2 if kind == "layer" else 1
    for r in res:
        assert r["fwd_calls"] == {}  # the norm itself is purely local
        for name, p in norm.named_parameters():
            assert err(r["grads"][name], p.grad) < 1e-12, (name, r["info"])
            if sequence_parallel and tp_degree > 1:
                # each tp rank saw S/t tokens: without the sync its gradient is a partial sum
                assert err(r["unsynced"][name], p.grad) > 1e-3, name
        assert r["synced"] == (n_params if sequence_parallel else 0)
        # one tiny all-reduce agrees which marked parameters have a gradient, then they all go in one
        # coalesced all-reduce; nothing at tp=1 or when unmarked
        assert r["sync_calls"] == ({"all_reduce": 2} if sequence_parallel and tp_degree > 1 else {})


def test_marks():
    assert all(p.sequence_parallel for p in tp.LayerNorm(4).parameters())
    assert not any(p.sequence_parallel for p in tp.RMSNorm(4, sequence_parallel=False).parameters())
    custom = tp.mark_sequence_parallel(nn.Linear(2, 2))
    assert all(p.sequence_parallel for p in custom.parameters())
    # without a mesh or process group the sync is a no-op that still counts the marked grads
    custom(torch.ones(2)).sum().backward()
    assert tp.sync_sequence_parallel_grads(custom) == 2
    assert tp.sync_sequence_parallel_grads(list(nn.Linear(2, 2).parameters())) == 0
