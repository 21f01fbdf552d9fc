"""seqpar.init: degrees, errors, groups and ranks of dp x ring x ulysses x tp."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.core.mesh import _resolve_degrees


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = seqpar.init()
    try:
        assert not dist.is_initialized()
        assert (mesh.dp, mesh.sp, mesh.tp, mesh.world_size) == (1, 1, 1, 1)
        assert mesh.sp_group is seqpar.mesh.SINGLE and mesh.rank("sp") == 0 and seqpar.get_mesh() is mesh
    finally:
        seqpar.set_mesh(None)


@pytest.mark.parametrize("kw,expected", [
    ({}, (1, 8, 1, 1)), ({"tp": 2}, (1, 4, 1, 2)), ({"dp": 2}, (2, 4, 1, 1)), ({"sp": 4}, (2, 4, 1, 1)),
    ({"sp": 4, "ulysses": 2}, (2, 2, 2, 1)), ({"ulysses": 2, "ring": 2, "tp": 2}, (1, 2, 2, 2)),
    ({"sp": 8, "ring": 2}, (1, 2, 4, 1)),
])
def test_degrees(kw, expected):
    assert _resolve_degrees(8, kw.get("sp"), kw.get("ulysses"), kw.get("ring"), kw.get("tp"), kw.get("dp")) == expected


@pytest.mark.parametrize("kw,needle", [
    ({"sp": 3}, "does not divide world size 8"), ({"dp": 3}, "does not divide world size 8"),
    ({"sp": 4, "dp": 4}, "dp=4 x sp=4 x tp=1 = 16 does not match world size 8"),
    ({"sp": 4, "ulysses": 3}, "ulysses=3 does not divide sp=4"), ({"tp": 0}, "positive integer"),
    ({"sp": 8, "ulysses": 2, "ring": 2}, "ulysses=2 x ring=2 = 4 does not match sp=8"),
])
def test_bad_degrees_name_the_problem(kw, needle):
    with pytest.raises(seqpar.ConfigError, match=needle.replace("(", r"\(")):
        _resolve_degrees(8, kw.get("sp"), kw.get("ulysses"), kw.get("ring"), kw.get("tp"), kw.get("dp"))


def w_groups(**degrees):
    mesh = seqpar.init(**degrees)
    ranks = {name: dist.get_process_group_ranks(mesh.group(name)) for name in ("dp", "sp", "ring", "ulysses", "tp", "dp_sp")}
    return {"ranks": ranks, "sp_rank": mesh.rank("sp"), "repr": repr(mesh)}


def test_groups_are_orthogonal_in_dp_ring_ulysses_tp_order(pool):
    res = pool(8).run(w_groups, dp=2, ulysses=2, ring=1, tp=2)
    r0 = res[0]["ranks"]
    assert r0["tp"] == [0, 1] and r0["ulysses"] == [0, 2] and r0["sp"] == [0, 2] and r0["dp"] == [0, 4]
    assert r0["dp_sp"] == [0, 2, 4, 6]
    assert res[5]["ranks"]["tp"] == [4, 5] and res[5]["ranks"]["dp"] == [1, 5]
    assert res[0]["repr"] == "Mesh(dp=2, sp=2 (ulysses=2 x ring=1), tp=2)"
    res = pool(4).run(w_groups, ulysses=2, ring=2)
    assert res[3]["ranks"]["sp"] == [0, 1, 2, 3] and res[3]["ranks"]["ring"] == [1, 3]
    assert [r["sp_rank"] for r in res] == [0, 1, 2, 3]  # sp rank = ring_rank * ulysses + ulysses_rank


def w_bad_init():
    try:
        seqpar.init(sp=3)
    except seqpar.ConfigError as e:
        return str(e)


def test_bad_degrees_fail_on_every_rank(pool):
    assert all("sp=3 x tp=1 = 3 does not divide world size 4" in m for m in pool(4).run(w_bad_init))


def test_default_backend_pairs_nccl_with_gloo_for_cpu_tensors(monkeypatch):
    """Under torchrun on GPUs the small CPU-tensor collectives (counts, norms, object broadcasts) need gloo
    beside NCCL: a NCCL-only group refuses them."""
    from seqpar.core.mesh import default_backend, on_cuda_backend

    assert default_backend() == ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert default_backend() == "cpu:gloo,cuda:nccl"
    assert not on_cuda_backend()  # no process group in this process
