"""Memory settings of the reference model: exact (loss and every gradient, float64) and saving what they claim.

The chunked loss against the logits' loss with the vocabulary split over tp (with and without Megatron
SP), recomputation (selective, full, chains), host offload of the checkpoints, tiled MLP blocks; the
saved bytes each setting leaves.  The pieces themselves (seqpar.core.recompute): tests/core/test_recompute.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import seqpar
from seqpar.core.mesh import Mesh
from seqpar.core.stats import saved_activations
from seqpar.models import LlamaForCausalLM
from seqpar.train import causal_lm_loss, causal_lm_loss_from_hidden, global_token_mean, shift_labels
from tests.helpers import mesh

SEQ, BATCH = 32, 2


def _data(seed: int = 0):
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = shift_labels(ids)
    labels[0, 3:9] = -100  # ignored targets take part in nothing
    return ids, labels


def _model(m, sp_on: bool = True, strategy: str = "ring", **memory) -> LlamaForCausalLM:
    model = LlamaForCausalLM("tiny", mesh=m, sequence_parallel=sp_on, dtype=torch.float64, strategy=strategy,
                             **memory)
    model.init_weights(7)
    return model


def loss_and_grads(degrees: dict, sp_on: bool, memory: dict, chunk: int | None, strategy: str = "ring") -> dict:
    """Worker task: the loss value, the gradients (single-device names) and the saved bytes on this rank."""
    m = mesh(**degrees) if degrees else Mesh()
    model = _model(m, sp_on, strategy, **memory)
    ids, labels = _data()
    ids_l, labels_l = seqpar.shard(ids, 1, mesh=m), seqpar.shard(labels, 1, mesh=m, pad_value=-100)
    with saved_activations(exclude=model.parameters()) as saved:
        if chunk is None:
            out = causal_lm_loss(model(ids_l), labels_l, m)
        else:
            out = global_token_mean(model(ids_l, labels=labels_l, loss_chunk=chunk), labels_l, m)
    out.loss.backward()
    seqpar.train.sync_gradients(model, m)
    return {"value": out.value.item(), "grads": model.full_state_dict(grads=True), "saved": saved.bytes,
            "host": model.offloader.peak_host_bytes}


def _assert_same(a: dict, b: dict) -> None:
    assert a["value"] == pytest.approx(b["value"], rel=1e-12)
    for name, g in b["grads"].items():
        torch.testing.assert_close(a["grads"][name], g, rtol=1e-10, atol=1e-12, msg=name)


LAYOUTS = [(1, {}, True), (2, {"tp": 2}, True), (2, {"tp": 2}, False), (4, {"tp": 2}, True)]


@pytest.mark.parametrize("world,degrees,sp_on", LAYOUTS, ids=["one", "tp2-sp", "tp2-nosp", "tp2-ring2"])
def test_chunked_loss_equals_the_logits_loss(pool, world, degrees, sp_on):
    ref = pool(1).run(loss_and_grads, {}, True, {}, None)[0]
    for chunk in (5, 64):  # uneven chunks; one chunk for all tokens
        for r in pool(world).run(loss_and_grads, degrees, sp_on, {}, chunk):
            _assert_same(r, ref)


SETTINGS = [{"recompute": "selective"}, {"recompute": "full"}, {"recompute": "full", "offload": True},
            {"recompute": "full", "checkpoint_every": 2}, {"mlp_tiles": 3},
            {"recompute": "full", "offload": True, "mlp_tiles": 2}]


@pytest.mark.parametrize("world,degrees", [(1, {}), (4, {"tp": 2})], ids=["one", "tp2-ring2"])
def test_every_setting_is_exact(pool, world, degrees):
    ref = pool(1).run(loss_and_grads, {}, True, {}, None)[0]
    for memory in SETTINGS:
        for r in pool(world).run(loss_and_grads, degrees, True, memory, 9):
            _assert_same(r, ref)


@pytest.mark.parametrize("strategy", ["ulysses", "allgather", "ring_qk_av"])
def test_recomputation_replays_every_strategy_exactly(pool, strategy):
    """Selective recomputation replays ring_qk_av's attention core (collectives included); full replays
    every strategy's layers in backward."""
    ref = pool(1).run(loss_and_grads, {}, True, {}, None)[0]
    for memory in ({"recompute": "selective"}, {"recompute": "full", "mlp_tiles": 2}):
        for r in pool(2).run(loss_and_grads, {"sp": 2}, True, memory, 9, strategy):
            _assert_same(r, ref)


def test_what_each_setting_keeps():
    """Full recomputation keeps each layer's input (or every k-th); offload moves it to host memory."""
    plain = loss_and_grads({}, True, {}, 9)
    sel = loss_and_grads({}, True, {"recompute": "selective"}, 9)
    tiles = loss_and_grads({}, True, {"mlp_tiles": 4}, 9)
    full = loss_and_grads({}, True, {"recompute": "full"}, 9)
    chain = loss_and_grads({}, True, {"recompute": "full", "checkpoint_every": 2}, 9)
    off = loss_and_grads({}, True, {"recompute": "full", "offload": True}, 9)
    layer_input = BATCH * SEQ * 64 * 8  # [B, S, h] float64, one per layer (tiny: 2 layers)
    assert full["saved"] - chain["saved"] == layer_input  # two layers, one chain: one checkpoint fewer
    assert full["saved"] - off["saved"] == 2 * layer_input and off["host"] == 2 * layer_input
    assert full["saved"] < tiles["saved"] < sel["saved"] < plain["saved"]
    assert plain["host"] == full["host"] == 0


def test_bad_memory_settings_and_configure_memory():
    with pytest.raises(seqpar.ConfigError, match="recompute='most'"):
        LlamaForCausalLM("tiny", mesh=Mesh(), recompute="most")
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    assert dataclasses.asdict(model.configure_memory(recompute="full", mlp_tiles=2))["mlp_tiles"] == 2
    assert all(layer.memory.recompute == "full" for layer in model.layers)


def test_loss_from_hidden_api_checks_its_inputs():
    h, w = torch.randn(1, 4, 8), torch.randn(16, 8)
    with pytest.raises(seqpar.ShapeError, match="target"):
        causal_lm_loss_from_hidden(h, w, torch.zeros(1, 5, dtype=torch.long), Mesh())
    with pytest.raises(seqpar.ConfigError, match="chunk=0"):
        causal_lm_loss_from_hidden(h, w, torch.zeros(1, 4, dtype=torch.long), Mesh(), chunk=0)
    with pytest.raises(seqpar.ShapeError, match="must lie in"):
        causal_lm_loss_from_hidden(h, w, torch.full((1, 4), 16), Mesh())
