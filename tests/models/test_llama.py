"""The reference model trains identically at every parallel degree: losses and parameters after 3 AdamW steps."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.core.mesh import Mesh
from seqpar.models import LlamaForCausalLM
from seqpar.train import causal_lm_loss, shift_labels, sync_gradients
from tests.helpers import mesh

SEQ, BATCH, STEPS, LR = 32, 2, 3, 1e-2


def _data(seed=0):
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return ids, shift_labels(ids)


def _init_state(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM("tiny", mesh=Mesh()).full_state_dict()


def _steps(model, m, ids, labels) -> list[float]:
    """STEPS AdamW steps with the exact global loss and gradient sync; the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        out = causal_lm_loss(model(ids), labels, m)
        out.loss.backward()
        sync_gradients(model, m)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.value))
    return losses


def train_parallel(degrees: dict, strategy: str, sequence_parallel: bool, layout: str = "zigzag"):
    m = mesh(**degrees)
    model = LlamaForCausalLM("tiny", mesh=m, strategy=strategy, layout=layout, sequence_parallel=sequence_parallel)
    model.load_full_state_dict(_init_state())
    ids, labels = _data()
    per = BATCH // m.dp
    rows = slice(m.rank("dp") * per, (m.rank("dp") + 1) * per)
    ids_l = seqpar.shard(ids[rows], 1, layout=layout, mesh=m)
    labels_l = seqpar.shard(labels[rows], 1, layout=layout, mesh=m, pad_value=-100)
    return {"losses": _steps(model, m, ids_l, labels_l), "state": model.full_state_dict()}


def _reference():
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    model.load_full_state_dict(_init_state())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, labels = _data()
    losses = []
    for _ in range(STEPS):
        out = causal_lm_loss(model(ids), labels, Mesh())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.value))
    return losses, model.full_state_dict()


REF = None


def _ref():
    global REF
    if REF is None:
        REF = _reference()
    return REF


CONFIGS = [  # (world, degrees, strategy, sequence_parallel)
    (1, {}, "ring", True),
    (4, {"sp": 4}, "ring", True), (4, {"sp": 4}, "ulysses", True), (4, {"sp": 4, "ulysses": 2}, "usp", True),
    (4, {"sp": 4}, "allgather", True),
    (4, {"tp": 2}, "ring", True), (4, {"tp": 2}, "ulysses", True), (4, {"tp": 2}, "ring", False),
    (4, {"dp": 2}, "ring", True), (4, {"dp": 2}, "ulysses", True),
    (4, {"dp": 2, "tp": 2}, "ring", True), (2, {"tp": 2}, "ring", True), (2, {"sp": 2}, "usp", True),
]


@pytest.mark.parametrize("world,degrees,strategy,sp_on", CONFIGS,
                         ids=[f"w{w}-{d}-{s}-{'sp' if on else 'nosp'}" for w, d, s, on in CONFIGS])
def test_three_steps_equal_one_process(pool, world, degrees, strategy, sp_on):
    ref_losses, ref_state = _ref()
    res = pool(world).run(train_parallel, degrees, strategy, sp_on)
    for r in res:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        for name, ref in ref_state.items():
            assert torch.allclose(r["state"][name], ref, atol=2e-5, rtol=1e-4), name


def test_full_state_roundtrip_and_bad_tp(pool):
    sd = _init_state()
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    model.load_full_state_dict(sd)
    assert all(torch.equal(model.full_state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(seqpar.ShapeError, match="kv heads=2 not divisible by tp=4"):
        LlamaForCausalLM("tiny", mesh=Mesh(tp=4))


def train_fsdp(degrees: dict, strategy: str):
    from torch.distributed.fsdp import fully_shard

    from seqpar.tp import sync_sequence_parallel_grads

    m = mesh(**degrees)
    model = LlamaForCausalLM("tiny", mesh=m, strategy=strategy)
    model.load_full_state_dict(_init_state())
    for layer in model.layers:
        fully_shard(layer, mesh=m.dp_sp_mesh)
    fully_shard(model, mesh=m.dp_sp_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, labels = _data()
    per = BATCH // m.dp
    rows = slice(m.rank("dp") * per, (m.rank("dp") + 1) * per)
    ids_l = seqpar.shard(ids[rows], 1, mesh=m)
    labels_l = seqpar.shard(labels[rows], 1, mesh=m, pad_value=-100)
    losses = []
    for _ in range(STEPS):
        out = causal_lm_loss(model(ids_l), labels_l, m)
        out.loss.backward()  # FSDP reduce-scatters (averages) over dp x sp: exact by the loss's scaling
        sync_sequence_parallel_grads(model, m)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.value))
    return {"losses": losses}


@pytest.mark.parametrize("degrees,strategy", [({"dp": 2, "sp": 2}, "ring"), ({"sp": 4, "ulysses": 2}, "usp")])
def test_fsdp2_over_dp_sp(pool, degrees, strategy):
    ref_losses, _ = _ref()
    for r in pool(4).run(train_fsdp, degrees, strategy):
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)


def train_tied(degrees: dict, tied: bool):
    import dataclasses

    from seqpar.core.configs import get_config

    cfg = dataclasses.replace(get_config("tiny"), tied_embeddings=tied)
    m = mesh(**degrees) if degrees else Mesh()
    model = LlamaForCausalLM(cfg, mesh=m, strategy="ring")
    model.init_weights(3)
    ids, labels = _data()
    ids_l, labels_l = (seqpar.shard(t, 1, mesh=m, pad_value=-100 if t is labels else 0) for t in (ids, labels))
    return _steps(model, m, ids_l, labels_l)


def test_tied_embeddings_at_tp2_sp2(pool):
    ref = train_tied({}, True)
    assert ref != pytest.approx(train_tied({}, False))  # tying changes the model: the test can tell
    for losses in pool(4).run(train_tied, {"tp": 2}, True):
        assert losses == pytest.approx(ref, rel=1e-5)
