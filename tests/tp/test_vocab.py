"""VocabParallelEmbedding and vocab_parallel_cross_entropy equal nn.Embedding and F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqpar
from seqpar import tp
from tests.helpers import DTYPES, mesh
from tests.tp import CONFIG_IDS, CONFIGS, assemble, err, full_randn, info, shard_seq, sum_over_sp

B, S, H, V = 2, 8, 8, 16
IGNORE = -100
TOL = {"float64": 1e-12, "float32": 2e-5}


def _data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (B, S), generator=g)
    target = torch.randint(0, V, (B, S), generator=g)
    target[0, 1] = target[1, 5] = target[1, 6] = IGNORE
    return ids, target


def _full_lm(dtype, padding_idx=None):
    torch.manual_seed(99)
    emb = nn.Embedding(V, H, padding_idx=padding_idx).to(dtype)
    if padding_idx is not None:  # a trained table's padding row need not be zero; its gradient must be
        with torch.no_grad():
            emb.weight[padding_idx] = 1.0
    return emb, nn.Linear(H, V, bias=False).to(dtype)


def w_lm(tp_degree: int, sequence_parallel: bool, dtype_name: str, padding_idx=None):
    """Embedding -> LM head (column parallel) -> vocab-parallel CE, with the full-batch mean loss."""
    m = mesh(tp=tp_degree)
    inf = info(m)
    emb_full, head_full = _full_lm(DTYPES[dtype_name], padding_idx)
    ids, target = _data()
    n_valid = int((target != IGNORE).sum())
    emb = tp.VocabParallelEmbedding.from_full(emb_full, mesh=m, sequence_parallel=sequence_parallel)
    head = tp.ColumnParallelLinear.from_full(head_full, mesh=m, sequence_parallel=sequence_parallel)
    # ids and targets: this sp rank's chunk, replicated over tp (the embedding shards the output itself)
    ids_sp, target_sp = shard_seq(ids, inf, False), shard_seq(target, inf, False)
    h = emb(ids_sp)
    h.retain_grad()
    logits = head(h)  # [B, S/sp, V/t]: never gathered
    loss = tp.vocab_parallel_cross_entropy(logits, target_sp, group=m.tp_group, reduction="sum") / n_valid
    loss.backward()
    grads = [emb.weight.grad, head.weight.grad]
    total = loss.detach().clone()
    sum_over_sp(grads + [total], m)
    full = emb.to_full(grad=True)
    return {"info": inf, "h": h.detach(), "dh": h.grad, "loss": total, "logits_shape": tuple(logits.shape),
            "emb_grad": full.weight.grad, "head_grad": head.to_full(grad=True).weight.grad,
            "padding_idx": full.padding_idx}


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_embedding_and_cross_entropy_match_single_device(pool, world, tp_degree, sequence_parallel, dtype_name):
    res = pool(world).run(w_lm, tp_degree, sequence_parallel, dtype_name)
    emb, head = _full_lm(DTYPES[dtype_name])
    emb, head = emb.double(), head.double()
    ids, target = _data()
    h = emb(ids)
    h.retain_grad()
    loss = F.cross_entropy(head(h).flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    loss.backward()
    tol = TOL[dtype_name]
    assert err(assemble(res, "h", sequence_parallel), h) < tol
    assert err(assemble(res, "dh", sequence_parallel), h.grad) < tol
    for r in res:
        assert r["logits_shape"] == (B, S // r["info"]["sp"], V // tp_degree)
        assert err(r["loss"], loss) < tol
        assert err(r["emb_grad"], emb.weight.grad) < tol
        assert err(r["head_grad"], head.weight.grad) < tol


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["nosp", "sp"])
def test_padding_row_gets_no_gradient_like_nn_embedding(pool, sequence_parallel):
    """padding_idx carries over from nn.Embedding (the row lives on tp rank 1 of 2 here)."""
    pad = 11
    ids, target = _data()
    assert (ids == pad).any()
    res = pool(2).run(w_lm, 2, sequence_parallel, "float64", pad)
    emb, head = _full_lm(torch.float64, pad)
    F.cross_entropy(head(emb(ids)).flatten(0, 1), target.flatten(), ignore_index=IGNORE).backward()
    assert emb.weight.grad[pad].eq(0).all()
    for r in res:
        assert r["padding_idx"] == pad and err(r["emb_grad"], emb.weight.grad) < 1e-12


def test_embedding_options_without_a_parallel_equivalent_are_refused():
    for kw in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        with pytest.raises(seqpar.ConfigError, match=next(iter(kw))):
            tp.VocabParallelEmbedding.from_full(nn.Embedding(V, H, **kw), mesh=seqpar.Mesh())
    with pytest.raises(seqpar.ConfigError, match="padding_idx=16 is not a row"):
        tp.VocabParallelEmbedding(V, H, padding_idx=V, mesh=seqpar.Mesh())


def _logits(n: int, scale: float):
    z = full_randn(n, V, seed=11) * scale
    g = torch.Generator().manual_seed(12)
    target = torch.randint(0, V, (n,), generator=g)
    target[::3] = IGNORE
    return z, target, full_randn(n, seed=13)


def w_ce(tp_degree: int, reduction: str, dtype_name: str, scale: float, all_ignored: bool = False):
    m = mesh(tp=tp_degree)
    z, target, g = _logits(12, scale)
    if all_ignored:
        target.fill_(IGNORE)
    z = z.to(DTYPES[dtype_name]).chunk(m.tp, -1)[m.rank("tp")].clone().requires_grad_()
    with seqpar.stats.track() as st:
        loss = tp.vocab_parallel_cross_entropy(z, target, group=m.tp_group, reduction=reduction)
        loss.backward(g if reduction == "none" else None)
    return {"loss": loss.detach(), "grad": z.grad, "calls": dict(st.calls), "tp_rank": m.rank("tp")}


def _ce_reference(reduction, scale, dtype_name, all_ignored=False):
    z, target, g = _logits(12, scale)
    if all_ignored:
        target.fill_(IGNORE)
    z = z.to(DTYPES[dtype_name]).double().requires_grad_()
    loss = F.cross_entropy(z, target, ignore_index=IGNORE, reduction=reduction)
    loss.backward(g if reduction == "none" else None)
    return loss.detach(), z.grad


@pytest.mark.parametrize("world,tp_degree", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["unit", "large-logits"])
def test_cross_entropy_on_vocab_shards(pool, world, tp_degree, reduction, scale):
    res = pool(world).run(w_ce, tp_degree, reduction, "float64", scale)
    loss, grad = _ce_reference(reduction, scale, "float64")
    full_grad = grad.chunk(tp_degree, -1)
    for r in res:
        assert err(r["loss"], loss) < 1e-12 * max(scale, 1)
        assert err(r["grad"], full_grad[r["tp_rank"]]) < 1e-12
        # max, then (target logit, sum exp) together; the backward is local
        assert r["calls"] == ({"all_reduce": 2} if tp_degree > 1 else {})


def test_cross_entropy_float32_and_bfloat16(pool):
    res = pool(2).run(w_ce, 2, "mean", "float32", 1.0)
    loss, grad = _ce_reference("mean", 1.0, "float32")
    assert err(res[0]["loss"], loss) < 1e-6 and err(torch.cat([r["grad"] for r in res], -1), grad) < 1e-6
    res = pool(2).run(w_ce, 2, "none", "bfloat16", 1.0)
    loss, grad = _ce_reference("none", 1.0, "bfloat16")
    assert res[0]["loss"].dtype == torch.float32  # statistics upcast; the gradient keeps the logits' dtype
    assert res[0]["grad"].dtype == torch.bfloat16
    assert err(res[0]["loss"], loss) < 1e-5 and err(torch.cat([r["grad"] for r in res], -1), grad) < 1e-2


def test_cross_entropy_all_ignored_mean_is_nan_like_torch(pool):
    res = pool(2).run(w_ce, 2, "mean", "float64", 1.0, True)
    loss, _ = _ce_reference("mean", 1.0, "float64", True)
    assert torch.isnan(loss) and all(torch.isnan(r["loss"]) for r in res)
