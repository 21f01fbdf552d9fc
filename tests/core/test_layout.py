"""Layouts: shard/unshard round trips, position ids, balance, errors."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.core.layout import get_layout
from tests.helpers import mesh

LAYOUTS = ["contiguous", "zigzag", "stripe"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_indices_partition_the_sequence(layout, n):
    lay = get_layout(layout)
    got = torch.cat([lay.indices(16 * n, n, r) for r in range(n)])
    assert torch.equal(got.sort().values, torch.arange(16 * n))


def test_zigzag_chunks():
    assert get_layout("zigzag").indices(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert get_layout("stripe").indices(8, 4, 1).tolist() == [1, 5]


def w_roundtrip(layout: str):
    m = mesh()
    x = torch.arange(2 * 16 * 3, dtype=torch.float64).view(2, 16, 3).requires_grad_()
    local = seqpar.shard(x, 1, layout=layout)
    pos = seqpar.position_ids(16, layout=layout)
    back = seqpar.unshard(local, 1, layout=layout)
    (local * (m.rank("sp") + 1)).sum().backward()
    return {"local": local.detach(), "pos": pos, "back": back.detach(), "grad": x.grad}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_unshard_roundtrip(pool, layout, world):
    x = torch.arange(2 * 16 * 3, dtype=torch.float64).view(2, 16, 3)
    expect_grad = torch.zeros(16)
    for r, res in enumerate(pool(world).run(w_roundtrip, layout)):
        assert torch.equal(res["local"], x[:, res["pos"]])
        assert torch.equal(res["back"], x)
        expect_grad[res["pos"]] = r + 1
    # shard's backward gathers: every rank holds the gradient of the replicated input
    for res in pool(world).run(w_roundtrip, layout):
        assert torch.equal(res["grad"][0, :, 0], expect_grad)


def w_bad_shard():
    mesh()
    try:
        seqpar.shard(torch.randn(1, 12, 2), 1, layout="zigzag")
    except seqpar.ShapeError as e:
        return str(e)


def test_shard_rejects_lengths_the_layout_cannot_split(pool):
    assert all("not divisible by 8 as layout 'zigzag' needs over 4 ranks" in m for m in pool(4).run(w_bad_shard))


def test_shard_dim_out_of_range_is_refused_not_wrapped():
    x = torch.randn(2, 8, 3, 4)
    for dim in (6, 4, -5):
        with pytest.raises(seqpar.ShapeError, match=f"dim={dim} is out of range for a 4-d tensor"):
            seqpar.shard(x, dim, mesh=seqpar.Mesh())
        with pytest.raises(seqpar.ShapeError, match="out of range"):
            seqpar.unshard(x, dim, mesh=seqpar.Mesh())
    assert seqpar.shard(x, -3, mesh=seqpar.Mesh()) is x


def w_unshard_mismatch():
    mesh()
    local = seqpar.shard(torch.randn(1, 16, 2), 1, layout="contiguous")
    try:
        seqpar.unshard(local, 1, layout="zigzag")
    except seqpar.ShapeError as e:
        return str(e)


def test_unshard_refuses_a_shard_split_another_way(pool):
    for msg in pool(2).run(w_unshard_mismatch):
        assert msg and "sharded with layout 'contiguous' over 2 ranks" in msg and "pass the same layout" in msg


def test_float_cu_seqlens_are_refused_not_truncated():
    for cu in (torch.tensor([0.0, 3.7, 8.0]), [0, 3.7, 8], torch.tensor([0, 1, 0], dtype=torch.bool)):
        with pytest.raises(seqpar.ShapeError, match="cu_seqlens must hold integers"):
            seqpar.shard(torch.randn(1, 8), 1, mesh=seqpar.Mesh(), cu_seqlens=cu)
    info = seqpar.shard(torch.randn(1, 8), 1, mesh=seqpar.Mesh(), cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
                        return_info=True)[1]
    assert info.cu_seqlens == (0, 3, 8)
