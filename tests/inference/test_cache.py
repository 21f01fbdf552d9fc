"""The sharded KV cache's storage: growth, compaction, forgetting a window's old keys, rollback."""
from __future__ import annotations

import pytest
import torch

from seqpar.inference import CacheError, KVCache, LayerCache
from seqpar.core.mesh import Mesh


def _kv(n: int, g: torch.Generator):
    return torch.randn(2, n, 3, 4, generator=g), torch.randn(2, n, 3, 4, generator=g)


def test_layer_cache_keeps_the_live_suffix_through_growth_and_compaction():
    g = torch.Generator().manual_seed(0)
    k0, v0 = _kv(5, g)
    layer = LayerCache(k0, v0, reserve=2)
    ks, vs, start = [k0], [v0], 0
    for step in range(60):
        k, v = _kv(1 + step % 3, g)
        ks.append(k)
        vs.append(v)
        layer.append(k, v)
        if step % 4 == 3:  # a sliding window forgets its oldest keys
            layer.drop_front(5)
            start = min(start + 5, sum(x.shape[1] for x in ks))
        want_k, want_v = torch.cat(ks, 1)[:, start:], torch.cat(vs, 1)[:, start:]
        assert layer.len == want_k.shape[1] and torch.equal(layer.k, want_k) and torch.equal(layer.v, want_v)
        assert layer.k.shape == (2, layer.len, 3, 4) and layer.nbytes() == 2 * want_k.numel() * 4
    # storage stays within a constant factor of what is live: freed room is reused before growing
    assert layer.capacity <= 4 * layer.len + 8


def test_layer_cache_is_head_major_and_refuses_mismatched_appends():
    g = torch.Generator().manual_seed(1)
    layer = LayerCache(*_kv(4, g))
    assert layer._k.shape == (2, 3, 4, 4)  # [B, Hkv, capacity, D]: a head's keys are contiguous
    with pytest.raises(CacheError, match="do not fit a cache of"):
        layer.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))


def test_rollback_undoes_the_appends_of_a_failed_step():
    g = torch.Generator().manual_seed(2)
    cache = KVCache(mesh=Mesh(), rank=0, n=1, lengths=[4], positions=torch.arange(4), prompt_len=4,
                    num_layers=2, batch=2)
    cache.layers = [LayerCache(*_kv(4, g)), LayerCache(*_kv(4, g))]
    before = [layer.k.clone() for layer in cache.layers]
    cache.begin()
    cache.layers[0].append(*_kv(1, g))  # the step failed before layer 1 appended
    cache.rollback()
    assert [layer.len for layer in cache.layers] == [4, 4]
    assert all(torch.equal(layer.k, b) for layer, b in zip(cache.layers, before))


def test_positions_and_their_tail():
    cache = KVCache(mesh=Mesh(), rank=0, n=1, lengths=[3], positions=torch.tensor([0, 5, 6]), prompt_len=7,
                    num_layers=1, batch=1)
    assert cache.ordered
    cache.commit(0, 7)
    cache.commit(0, 8)
    assert cache.positions.tolist() == [0, 5, 6, 7, 8]
    assert [cache.tail_positions(n).tolist() for n in (0, 1, 3, 5)] == [[], [8], [6, 7, 8], [0, 5, 6, 7, 8]]
    assert not KVCache(mesh=Mesh(), rank=0, n=1, lengths=[2], positions=torch.tensor([3, 1]), prompt_len=4,
                       num_layers=1, batch=1).ordered
