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


def test_a_layer_step_is_a_transaction_even_across_growth():
    g = torch.Generator().manual_seed(3)
    k0, v0 = _kv(3, g)
    layer = LayerCache(k0, v0)  # no spare room: the step's appends reallocate the storage
    layer.begin()
    layer.append(*_kv(1, g))
    layer.append(*_kv(2, g))
    assert layer.len == 6 and layer.capacity > 3
    layer.rollback()
    assert layer.len == 3 and torch.equal(layer.k, k0) and torch.equal(layer.v, v0)
    k1, v1 = _kv(1, g)
    layer.begin()
    layer.append(k1, v1)
    layer.commit()
    layer.rollback()  # nothing since the commit: the committed token stays
    assert torch.equal(layer.k, torch.cat([k0, k1], 1)) and torch.equal(layer.v, torch.cat([v0, v1], 1))


def test_commit_records_the_token_on_its_owner_and_rollback_restores_every_layer():
    g = torch.Generator().manual_seed(4)
    cache = KVCache(mesh=Mesh(), rank=1, n=2, lengths=[3, 2], positions=torch.tensor([1, 3]), prompt_len=5,
                    num_layers=2, batch=2)
    assert cache.missing() == [0, 1]
    for i in range(2):
        cache.fill(i, *_kv(2, g), reserve=1)
    assert cache.missing() == [] and cache.next_owner() == 1
    before = [(cache.layer(i).k.clone(), cache.layer(i).v.clone()) for i in range(2)]
    cache.begin()  # this rank owns the token: every layer appends it, then the step fails
    for i in range(2):
        cache.layer(i).append(*_kv(1, g))
    cache.rollback()
    assert all(torch.equal(cache.layer(i).k, k) and torch.equal(cache.layer(i).v, v) for i, (k, v) in enumerate(before))
    assert cache.lengths == [3, 2] and cache.positions.tolist() == [1, 3]
    cache.begin()
    for i in range(2):
        cache.layer(i).append(*_kv(1, g))
    cache.commit(1, 5)
    assert cache.lengths == [3, 3] and cache.positions.tolist() == [1, 3, 5] and cache.layer(0).len == 3
    cache.begin()  # rank 0 stores the next token: this rank only counts it
    cache.commit(0, 6)
    assert cache.lengths == [4, 3] and cache.positions.tolist() == [1, 3, 5] and cache.seq_len == 7


def test_layers_that_do_not_exist_or_were_never_filled_are_named():
    cache = KVCache(mesh=Mesh(), rank=0, n=1, lengths=[2], positions=torch.arange(2), prompt_len=2, num_layers=2,
                    batch=2)
    cache.fill(0, *_kv(2, torch.Generator().manual_seed(5)))
    with pytest.raises(CacheError, match="layer 1 of the cache was never filled"):
        cache.layer(1)
    with pytest.raises(CacheError, match="layer 2 is not a layer of this 2-layer cache"):
        cache.fill(2, *_kv(2, torch.Generator().manual_seed(5)))
    with pytest.raises(CacheError, match="owner 1 is not a rank"):
        cache.commit(1, 2)
