"""Column -> GELU -> row MLP on tp ranks equals the single-device nn.Linear MLP, forward and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqpar
from seqpar import tp
from tests.helpers import DTYPES, mesh
from tests.tp import CONFIG_IDS, CONFIGS, assemble, err, full_randn, info, shard_seq, sum_over_sp

B, S, H, FF = 2, 8, 8, 16
TOL = {"float64": 1e-12, "float32": 2e-5}


def _full_mlp(dtype: torch.dtype, seq_dim: int = 1):
    """The single-device MLP and its data: (fc1, fc2, x, dy), identical in every process."""
    torch.manual_seed(1234)
    fc1, fc2 = nn.Linear(H, FF).to(dtype), nn.Linear(FF, H).to(dtype)
    shape = (B, S, H) if seq_dim == 1 else (S, B, H)
    return fc1, fc2, full_randn(*shape, seed=1, dtype=dtype), full_randn(*shape, seed=2, dtype=dtype)


def w_mlp(tp_degree: int, mode: str, dtype_name: str, seq_dim: int = 1):
    m = mesh(tp=tp_degree)
    inf = info(m)
    sp_on = mode == "sp"
    fc1, fc2, x, dy = _full_mlp(DTYPES[dtype_name], seq_dim)
    if mode == "gathered":  # gather the FFN activation and split it again: replicated in the middle
        up = tp.ColumnParallelLinear.from_full(fc1, mesh=m, gather_output=True, seq_dim=seq_dim)
        down = tp.RowParallelLinear.from_full(fc2, mesh=m, input_is_parallel=False, seq_dim=seq_dim)
    else:
        up = tp.ColumnParallelLinear.from_full(fc1, mesh=m, sequence_parallel=sp_on, seq_dim=seq_dim)
        down = tp.RowParallelLinear.from_full(fc2, mesh=m, sequence_parallel=sp_on, seq_dim=seq_dim)
    xs = shard_seq(x, inf, sp_on, seq_dim).requires_grad_()
    with seqpar.stats.track() as st:
        y = down(F.gelu(up(xs)))
        y.backward(shard_seq(dy, inf, sp_on, seq_dim))
    model = nn.ModuleList([up, down])
    bias_unsynced = down.bias.grad.clone()
    synced = tp.sync_sequence_parallel_grads(model, m)
    sum_over_sp([p.grad for p in model.parameters()] + [bias_unsynced], m)
    f1, f2 = up.to_full(grad=True), down.to_full(grad=True)
    grads = {"fc1.weight": f1.weight.grad, "fc1.bias": f1.bias.grad, "fc2.weight": f2.weight.grad,
             "fc2.bias": f2.bias.grad}
    return {"info": inf, "y": y.detach(), "dx": xs.grad, "grads": grads, "bias_unsynced": bias_unsynced,
            "synced": synced, "calls": dict(st.calls), "local_shape": tuple(up.weight.shape)}


def _reference(dtype_name: str, seq_dim: int = 1):
    fc1, fc2, x, dy = _full_mlp(torch.float64, seq_dim)
    x = x.to(DTYPES[dtype_name]).double().requires_grad_()  # the same (rounded) inputs, in float64
    for p in list(fc1.parameters()) + list(fc2.parameters()):
        p.data = p.data.to(DTYPES[dtype_name]).double()
    y = fc2(F.gelu(fc1(x)))
    y.backward(dy.to(DTYPES[dtype_name]).double())
    grads = {f"fc{i}.{n}": p.grad for i, mod in ((1, fc1), (2, fc2)) for n, p in mod.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("mode", ["plain", "sp", "gathered"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_mlp_matches_single_device(pool, world, tp_degree, mode, dtype_name):
    res = pool(world).run(w_mlp, tp_degree, mode, dtype_name)
    y, dx, grads = _reference(dtype_name)
    sp_on, tol = mode == "sp", TOL[dtype_name]
    assert err(assemble(res, "y", sp_on), y) < tol
    assert err(assemble(res, "dx", sp_on), dx) < tol
    for r in res:
        assert r["local_shape"] == (FF // tp_degree, H)
        for name, g in grads.items():
            assert err(r["grads"][name], g) < tol, (name, r["info"])
        # only the row bias on sequence shards needs (and gets) the tp sync
        assert r["synced"] == (1 if sp_on else 0)
        if sp_on and tp_degree > 1:
            assert err(r["bias_unsynced"], grads["fc2.bias"]) > 1e-3, "unsynced bias grad should be partial"
    # communication: one tp collective forward, its dual backward (none at all when tp is 1)
    expected = {"plain": {"all_reduce": 2}, "sp": {"all_gather": 3, "reduce_scatter": 2},
                "gathered": {"all_gather": 2, "all_reduce": 2}}[mode]
    assert res[0]["calls"] == (expected if tp_degree > 1 else {})


@pytest.mark.parametrize("mode", ["plain", "sp"])
def test_mlp_seq_first_layout(pool, mode):
    """seq_dim=0: Megatron's [S, B, h] activations."""
    res = pool(4).run(w_mlp, 2, mode, "float64", 0)
    y, dx, grads = _reference("float64", 0)
    assert err(assemble(res, "y", mode == "sp", 0), y) < 1e-12
    assert err(assemble(res, "dx", mode == "sp", 0), dx) < 1e-12
    assert all(err(r["grads"][k], g) < 1e-12 for r in res for k, g in grads.items())


def w_round_trip(tp_degree: int):
    m = mesh(tp=tp_degree)
    torch.manual_seed(7)
    lin, emb = nn.Linear(8, 12, dtype=torch.float64), nn.Embedding(16, 4, dtype=torch.float64)
    row = nn.Linear(12, 8, dtype=torch.float64)
    state = torch.get_rng_state()
    layers = {"column": tp.ColumnParallelLinear.from_full(lin, mesh=m),
              "row": tp.RowParallelLinear.from_full(row, mesh=m),
              "embedding": tp.VocabParallelEmbedding.from_full(emb, mesh=m)}
    rng_untouched = torch.equal(state, torch.get_rng_state())
    back = {k: {n: p.detach() for n, p in v.to_full().state_dict().items()} for k, v in layers.items()}
    # default init: the same numbers as the single-device module for the same seed, whatever tp is
    torch.manual_seed(3)
    col, row, vemb = tp.ColumnParallelLinear(8, 12, mesh=m), tp.RowParallelLinear(12, 8, mesh=m), \
        tp.VocabParallelEmbedding(16, 4, mesh=m)
    init = {k: v.to_full().state_dict() for k, v in (("column", col), ("row", row), ("embedding", vemb))}
    return {"back": back, "init": init, "rng_untouched": rng_untouched,
            "types": [type(v.to_full()).__name__ for v in layers.values()]}


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
def test_from_full_to_full_round_trip_and_tp_invariant_init(pool, world, tp_degree):
    res = pool(world).run(w_round_trip, tp_degree)
    torch.manual_seed(7)
    lin, emb = nn.Linear(8, 12, dtype=torch.float64), nn.Embedding(16, 4, dtype=torch.float64)
    row = nn.Linear(12, 8, dtype=torch.float64)
    torch.manual_seed(3)
    ref_init = {"column": nn.Linear(8, 12).state_dict(), "row": nn.Linear(12, 8).state_dict(),
                "embedding": nn.Embedding(16, 4).state_dict()}
    for r in res:
        assert r["rng_untouched"] and r["types"] == ["Linear", "Linear", "Embedding"]
        for key, mod in (("column", lin), ("row", row), ("embedding", emb)):
            ref = mod.state_dict()
            assert r["back"][key].keys() == ref.keys()
            assert all(torch.equal(r["back"][key][n], ref[n]) for n in ref), key
            assert all(torch.equal(r["init"][key][n], ref_init[key][n]) for n in ref_init[key]), key


def test_parameter_marks_and_repr():
    col = tp.ColumnParallelLinear(4, 6)
    row = tp.RowParallelLinear(6, 4, sequence_parallel=True)
    assert col.weight.partition_dim == 0 and col.bias.partition_dim == 0 and row.weight.partition_dim == 1
    assert row.bias.sequence_parallel and not getattr(col.bias, "sequence_parallel", False)
    assert not tp.RowParallelLinear(6, 4).bias.sequence_parallel
    assert "tp=1" in repr(col) and "sequence_parallel=True" in repr(row)
    meta = tp.ColumnParallelLinear(4, 6, device="meta")  # no init on meta: build big, load later
    assert meta.weight.is_meta


def w_saved_and_autocast(autocast: bool):
    """Column layer on sequence shards: what autograd stores, and bf16 autocast against F.linear."""
    m = mesh(tp=2)
    torch.manual_seed(0)
    full = nn.Linear(6, 8)
    col = tp.ColumnParallelLinear.from_full(full, mesh=m, sequence_parallel=True)
    x = full_randn(2, 4, 6, seed=3, dtype=torch.float32)
    xs = x.chunk(2, 1)[m.rank("tp")].clone().requires_grad_()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = col(xs)
    y.float().sum().backward()
    f = col.to_full(grad=True)  # .grad does not travel with a pickled module: return the tensors
    return {"shapes": shapes, "y": y.detach(), "y_dtype": y.dtype, "dx": xs.grad,
            "dw": f.weight.grad, "db": f.bias.grad, "rank": m.rank("tp")}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_sequence_parallel_column_stores_only_the_shard(pool, autocast):
    res = pool(2).run(w_saved_and_autocast, autocast)
    torch.manual_seed(0)
    full = nn.Linear(6, 8)
    x = full_randn(2, 4, 6, seed=3, dtype=torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = full(x)
    y.float().sum().backward()
    tol = 1e-2 if autocast else 1e-5
    for r in res:
        assert (2, 2, 6) in r["shapes"] and (2, 4, 6) not in r["shapes"], r["shapes"]  # never the gathered input
        assert r["y_dtype"] == y.dtype
        assert err(r["y"], y.chunk(2, -1)[r["rank"]]) < tol
        assert err(r["dx"], x.grad.chunk(2, 1)[r["rank"]]) < tol
        assert r["dw"].dtype == torch.float32
        assert err(r["dw"], full.weight.grad) < tol * 4 and err(r["db"], full.bias.grad) < tol


def w_deepcopy():
    import copy
    m = mesh(tp=2)
    model = nn.Sequential(tp.ColumnParallelLinear(4, 8, mesh=m, sequence_parallel=True), nn.GELU(),
                          tp.RowParallelLinear(8, 4, mesh=m, sequence_parallel=True), tp.LayerNorm(4))
    twin = copy.deepcopy(model)  # e.g. an EMA copy: process groups shared, parameter marks kept
    x = full_randn(2, 2, 4, seed=m.rank("tp"), dtype=torch.float32)
    same = torch.equal(model(x), twin(x))
    marks = [getattr(p, "sequence_parallel", False) for p in twin.parameters()]
    return {"same": same, "shared_group": twin[0].tp_group is model[0].tp_group, "marks": marks,
            "partition_dims": [getattr(p, "partition_dim", None) for p in twin.parameters()]}


def test_deepcopy_shares_the_group_and_keeps_marks(pool):
    for r in pool(2).run(w_deepcopy):
        assert r["same"] and r["shared_group"]
        assert r["marks"] == [False, False, False, True, True, True]  # col w, col b, row w, row b, ln w, ln b
        assert r["partition_dims"] == [0, 0, 1, None, None, None]


def test_row_parallel_output_dtype_under_autocast_is_nn_linears():
    full = torch.nn.Linear(8, 4)
    row = tp.RowParallelLinear.from_full(full, mesh=seqpar.Mesh())
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = full(x), row(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
