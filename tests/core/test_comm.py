"""Differentiable collectives and the ring exchange, forward and backward, against single-process math."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.core import comm
from seqpar.train import sync_gradients
from tests.helpers import mesh


def _full(shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def w_forward_backward(op: str, dim: int):
    """Apply ``op`` to this rank's input; return output and input gradient for a seeded output gradient."""
    m = mesh()
    n, r = m.sp, m.rank("sp")
    x_all = _full((n, 4 * n, 2 * n, 3))  # rank i's input is x_all[i]
    # split and copy_to_group take a replicated input (Megatron's scatter / copy to a region)
    x = x_all[0 if op in REPLICATED_IN else r].clone().requires_grad_()
    if op == "all_gather":
        y = comm.all_gather(x, dim)
    elif op == "reduce_scatter":
        y = comm.reduce_scatter(x, dim)
    elif op == "split":
        y = comm.split(x, dim)
    elif op == "all_to_all":
        y = comm.all_to_all(x, scatter_dim=dim, gather_dim=1 - dim + 1 if dim != 1 else 2)
    elif op == "all_reduce":
        y = comm.all_reduce(x)
    else:
        y = comm.copy_to_group(x)
    g_all = _full((n,) + tuple(y.shape), seed=1)
    y.backward(g_all[r])
    return {"y": y.detach(), "dx": x.grad}


def _expected(op, dim, n):
    """Single-process math for what every rank should see: (y per rank, dx per rank)."""
    x_all = _full((n, 4 * n, 2 * n, 3))
    if op in REPLICATED_IN:
        xs = [x_all[0].clone().requires_grad_()] * n
    else:
        xs = [x_all[i].clone().requires_grad_() for i in range(n)]
    if op == "all_gather":
        full = torch.cat(xs, dim)
        ys = [full] * n
    elif op == "reduce_scatter":
        ys = list(sum(xs).chunk(n, dim))
    elif op == "split":
        ys = [xs[i].chunk(n, dim)[i] for i in range(n)]
    elif op == "all_to_all":
        gd = 1 - dim + 1 if dim != 1 else 2
        ys = [torch.cat([xs[j].chunk(n, dim)[i] for j in range(n)], gd) for i in range(n)]
    elif op == "all_reduce":
        ys = [sum(xs)] * n
    else:
        ys = xs
    g_all = _full((n,) + tuple(ys[0].shape), seed=1)
    if op == "all_reduce":  # Megatron semantics: the replicated output's gradient is already whole
        return [y.detach() for y in ys], list(g_all)
    # the global loss is the sum of every rank's local loss
    loss = sum((ys[i] * g_all[i]).sum() for i in range(n))
    if op in REPLICATED_IN:
        return [y.detach() for y in ys], [torch.autograd.grad(loss, xs[0])[0]] * n
    return [y.detach() for y in ys], list(torch.autograd.grad(loss, xs))


REPLICATED_IN = ("split", "copy_to_group")
OPS = ["all_gather", "reduce_scatter", "split", "all_to_all", "all_reduce", "copy_to_group"]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dim", [0, 1])
def test_collectives_forward_and_backward(pool, world, op, dim):
    res = pool(world).run(w_forward_backward, op, dim)
    ys, dxs = _expected(op, dim, world)
    for r in range(world):
        assert torch.allclose(res[r]["y"], ys[r], atol=1e-12), (op, r)
        assert torch.allclose(res[r]["dx"], dxs[r], atol=1e-12), (op, r)


def w_ring(mode: str, rounds: int):
    m = mesh()
    n, r = m.sp, m.rank("sp")
    ring = comm.RingExchange(m.sp_group, ring_transport=mode)
    x = torch.full((3, 5), float(r))
    seen = [int(block[0, 0]) for _, block in ring.rotate(x)]
    carry = ring.carry()
    for src, _ in ring.rotate(x):
        carry.add(torch.full((2,), float(r * 10 + src)))  # this rank's contribution to block src
    with seqpar.stats.track() as st:
        for _ in range(rounds):
            x = ring.start(x).wait()
    return {"seen": seen, "total": carry.total().tolist(), "after": int(x[0, 0]), "calls": dict(st.calls)}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["p2p", "alltoall", "auto"])
def test_ring_exchange(pool, world, mode):
    for r, res in enumerate(pool(world).run(w_ring, mode, 3)):
        assert res["seen"] == [(r - s) % world for s in range(world)]  # own block first, then from rank-1, ...
        assert res["total"] == [float(sum(q * 10 + r for q in range(world)))] * 2  # every rank's contribution
        assert res["after"] == (r - 3) % world
        assert res["calls"] == ({"ring_exchange": 3} if world > 1 else {})


def w_uneven(op: str):
    mesh()
    x = torch.randn(3, 5)
    try:
        if op == "reduce_scatter":
            comm.reduce_scatter(x, 1)
        elif op == "split":
            comm.split(x, 0)
        else:
            comm.all_to_all(x, 1, 0)
    except seqpar.ShapeError as e:
        return str(e)
    return None


@pytest.mark.parametrize("op", ["reduce_scatter", "split", "all_to_all"])
def test_uneven_split_is_a_clear_error_on_every_rank(pool, op):
    msgs = pool(2).run(w_uneven, op)
    assert all(m and "not divisible by the group size 2" in m for m in msgs), msgs


def test_bad_ring_mode():
    with pytest.raises(seqpar.ConfigError, match="unknown ring_transport"):
        comm.RingExchange(None, ring_transport="carrier-pigeon")


def grads_used_on_some_ranks():
    """sp=2: parameter b takes part in rank 1's backward only, c in nobody's."""
    m = mesh(sp=2)
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({k: torch.nn.Linear(3, 1, bias=False) for k in "abc"}).double()
    x = torch.full((1, 3), float(m.rank("sp") + 1), dtype=torch.float64)
    loss = model["a"](x).sum() + (model["b"](x).sum() if m.rank("sp") == 1 else 0)
    loss.backward()
    with seqpar.stats.track() as st:
        sync_gradients(model, m)
    return {k: None if p.weight.grad is None else p.weight.grad.clone() for k, p in model.items()}, dict(st.calls)


def test_a_gradient_missing_on_some_ranks_is_taken_as_zero(pool):
    """Ranks agree on which parameters have gradients before the coalesced all-reduce (a layout that
    differed between ranks aborted gloo); one unused everywhere stays without a gradient."""
    for grads, calls in pool(2).run(grads_used_on_some_ranks):
        assert torch.equal(grads["a"], torch.full((1, 3), 1.5, dtype=torch.float64))  # (1 + 2) / 2
        assert torch.equal(grads["b"], torch.full((1, 3), 1.0, dtype=torch.float64))  # (0 + 2) / 2
        assert grads["c"] is None
        assert calls == {"all_reduce": 2}  # the agreement, then the gradients


def w_group_none_means_the_default_mesh_group():
    """One meaning of group=None at every public call: the default mesh's group of that kind."""
    import warnings

    from seqpar.core.mesh import SINGLE
    from seqpar.tp import mappings

    m = mesh(tp=2)  # 4 ranks: sp=2 x tp=2
    x = torch.ones(1, 4, 6)
    with seqpar.stats.track() as st:
        out = {"comm": tuple(comm.all_gather(x, 1).shape), "comm_single": tuple(comm.all_gather(x, 1, SINGLE).shape),
               "tp": tuple(mappings.gather_from_tensor_parallel_region(x, None).shape),
               "ring": comm.RingExchange(None).size, "ring_single": comm.RingExchange(SINGLE).size}
        q = torch.randn(1, 4, 2, 8)
        local = seqpar.attention(q, q, q, causal=True, group=SINGLE)
    out["local_equal"] = torch.allclose(local, seqpar.attention(q, q, q, causal=True, mesh=seqpar.Mesh()))
    out["calls"] = dict(st.calls)
    out["trivial_mesh_group"] = seqpar.Mesh().sp_group is SINGLE and seqpar.Mesh().tp_group is SINGLE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comm.RingExchange(m.sp_group, resolved=True)
    out["deprecated"] = any(issubclass(w.category, DeprecationWarning) and "resolved" in str(w.message)
                            for w in caught)
    return out


def test_group_none_has_one_meaning(pool):
    for res in pool(4).run(w_group_none_means_the_default_mesh_group):
        assert res["comm"] == (1, 8, 6) and res["comm_single"] == (1, 4, 6)  # sp group; SINGLE stays local
        assert res["tp"] == (1, 4, 12)  # tp's None is the default mesh's tp group
        assert res["ring"] == 2 and res["ring_single"] == 1
        assert res["local_equal"] and res["trivial_mesh_group"] and res["deprecated"]
        assert res["calls"] == {"all_gather": 2}  # the two gathers above; the SINGLE attention sent nothing
