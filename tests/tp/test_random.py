"""Dropout streams: the RNG tracker and model_parallel_seed's per-shard seeding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqpar
from seqpar import tp
from tests.helpers import mesh
from tests.tp import CONFIG_IDS, CONFIGS, info

N = 256  # elements per mask: two independent masks agree with probability 2**-256


def _mask() -> torch.Tensor:
    return F.dropout(torch.ones(N), p=0.5) > 0


def w_streams(tp_degree: int, sequence_parallel: bool, seed: int):
    m = mesh(tp=tp_degree)
    seeds = tp.model_parallel_seed(seed, m, sequence_parallel=sequence_parallel)
    tracker = tp.get_rng_tracker()
    d1 = _mask()
    with tracker.fork():
        t1 = _mask()
    d2 = _mask()  # continues the default stream as if the fork had not happened
    with tracker.fork(tp.TENSOR_PARALLEL_RNG):
        t2 = _mask()  # continues the tensor-parallel stream
    return {"info": info(m), "seeds": seeds, "d": (d1, d2), "t": (t1, t2)}


def _by_rank(res):
    return {(r["info"]["sp_rank"], r["info"]["tp_rank"]): r for r in res}


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["nosp", "sp"])
def test_stream_properties(pool, world, tp_degree, sequence_parallel):
    res = pool(world).run(w_streams, tp_degree, sequence_parallel, 1234)
    again = pool(world).run(w_streams, tp_degree, sequence_parallel, 1234)
    other = pool(world).run(w_streams, tp_degree, sequence_parallel, 77)
    by = _by_rank(res)
    for r, a, o in zip(res, again, other):
        # same seed and rank -> same masks; another seed -> other masks
        assert all(torch.equal(x, y) for x, y in zip(r["d"] + r["t"], a["d"] + a["t"]))
        assert not torch.equal(r["d"][0], o["d"][0]) and not torch.equal(r["t"][0], o["t"][0])
        # streams continue across forks, and the fork leaves the default stream untouched
        assert not torch.equal(r["d"][0], r["d"][1]) and not torch.equal(r["t"][0], r["t"][1])
        with torch.random.fork_rng():
            torch.manual_seed(r["seeds"]["default"])
            assert torch.equal(_mask(), r["d"][0]) and torch.equal(_mask(), r["d"][1])
            torch.manual_seed(r["seeds"][tp.TENSOR_PARALLEL_RNG])
            assert torch.equal(_mask(), r["t"][0]) and torch.equal(_mask(), r["t"][1])
    sp = res[0]["info"]["sp"]
    for (s, t), r in by.items():
        if sp == 1:  # Megatron's tensor-parallel seed when there is no (ring/ulysses) sequence parallelism
            assert r["seeds"][tp.TENSOR_PARALLEL_RNG] == 1234 + 2718 + t
        for (s2, t2), r2 in by.items():
            if (s2, t2) == (s, t):
                continue
            # tensor-parallel stream: different on every rank holding other data (tp shard or sp shard)
            assert not torch.equal(r["t"][0], r2["t"][0])
            same_default = torch.equal(r["d"][0], r2["d"][0])
            if s2 != s:  # other sequence shard: other default masks
                assert not same_default
            else:  # same sp shard, other tp rank: replicated activations need the same default mask
                assert same_default == (not sequence_parallel)


def test_tracker_errors_and_restores_on_exception():
    tracker = tp.RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(seqpar.ConfigError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(seqpar.ConfigError, match="unknown RNG stream 'b'"):
        with tracker.fork("b"):
            pass
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(KeyError):
        with tracker.fork("a"):
            torch.rand(10)
            raise KeyError("boom")
    assert torch.equal(torch.rand(3), expected)  # default generator restored despite the exception


def test_tracker_states_round_trip_for_recomputation():
    tracker = tp.RNGStatesTracker()
    tracker.add("s", 42)
    saved = tracker.get_states()
    with tracker.fork("s"):
        first = torch.rand(4)
    tracker.set_states(saved)  # e.g. activation recomputation replays the same dropout
    with tracker.fork("s"):
        assert torch.equal(torch.rand(4), first)
    assert tracker.names == ["s"]
    with torch.random.fork_rng():
        torch.manual_seed(42)
        assert torch.equal(torch.rand(4), first)  # the stream is the default generator seeded with 42
