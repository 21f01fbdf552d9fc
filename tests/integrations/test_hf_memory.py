"""Memory settings on Hugging Face models (hf.apply's recompute/offload/mlp_tiles, hf_memory.model_loss): exact.

Against the same model without them, sequence-parallel at world 1 and 2 (and dp x sp at 4), in
float64: the global loss and every gradient (averaged over dp x sp).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", minversion="4.53",
                                   reason="needs transformers>=4.53 (pip install transformers)")

import seqpar  # noqa: E402
from seqpar.core.errors import ConfigError  # noqa: E402
from seqpar.core.stats import saved_activations  # noqa: E402
from seqpar.integrations import hf, hf_memory  # noqa: E402
from tests.helpers import mesh  # noqa: E402
from tests.integrations.test_hf import build, data  # noqa: E402


def loss_and_grads(arch: str, degrees: dict, memory: dict, chunk: int | None) -> dict:
    """Worker task: the global loss and the dp x sp averaged gradients with ``memory`` (and the chunked loss)."""
    m = mesh(**degrees)
    model = build(arch).double()
    hf.apply(model, m, strategy="ring", **memory)
    ids = data(2, 32, seed=3)
    per = 2 // m.dp
    rows = slice(m.rank("dp") * per, (m.rank("dp") + 1) * per)
    local = hf.shard_batch({"input_ids": ids[rows], "labels": ids[rows]}, m)
    with saved_activations(exclude=model.parameters()) as saved:
        if chunk is None:
            labels = local.pop("labels")
            del local["shift_labels"]
            out = hf.causal_lm_loss(model(**local).logits, labels, m)
        else:
            out = hf_memory.model_loss(model, local, m, chunk=chunk)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if m.dp * m.sp > 1:
        dist.all_reduce(grads, group=m.dp_sp_group)
        grads /= m.dp * m.sp
    return {"value": out.value.item(), "grads": grads, "saved": saved.bytes,
            "host": hf_memory.memory_config(model).offload and model._seqpar_offloader.peak_host_bytes}


SETTINGS = [({"recompute": "full"}, None), ({"recompute": "full", "offload": True}, None),
            ({"mlp_tiles": 3}, None), ({}, 7), ({"recompute": "full", "offload": True, "mlp_tiles": 2}, 64)]


@pytest.mark.parametrize("world,degrees", [(1, {}), (2, {"sp": 2}), (4, {"dp": 2, "sp": 2})],
                         ids=["one", "ring2", "dp2-ring2"])
def test_memory_settings_are_exact_on_hf_llama(pool, world, degrees):
    ref = pool(1).run(loss_and_grads, "llama", {}, {}, None)[0]
    for memory, chunk in SETTINGS:
        res = pool(world).run(loss_and_grads, "llama", degrees, memory, chunk)[0]
        assert res["value"] == pytest.approx(ref["value"], rel=1e-12), (memory, chunk)
        torch.testing.assert_close(res["grads"], ref["grads"], rtol=1e-9, atol=1e-12, msg=str((memory, chunk)))


def test_checkpointed_layers_keep_their_inputs_only_and_offload_moves_them():
    plain = loss_and_grads("llama", {}, {}, 16)
    full = loss_and_grads("llama", {}, {"recompute": "full"}, 16)
    off = loss_and_grads("llama", {}, {"recompute": "full", "offload": True}, 16)
    layer_input = 2 * 32 * 64 * 8  # [B, S, h] float64, per decoder layer (2 layers)
    assert full["saved"] < plain["saved"] and full["saved"] - off["saved"] == 2 * layer_input
    assert off["host"] == 2 * layer_input


def test_what_hf_models_refuse_by_name():
    model = build("llama")
    with pytest.raises(ConfigError, match="recompute='selective' is implemented for seqpar's own model only"):
        hf_memory.apply_memory(model, recompute="selective")
    with pytest.raises(ConfigError, match="checkpoint_every=2"):
        hf_memory.apply_memory(model, recompute="full", checkpoint_every=2)
    with pytest.raises(ConfigError, match="offload=True"):
        hf_memory.apply_memory(model, offload=True)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(ConfigError, match="HF's gradient checkpointing is on"):
        hf_memory.apply_memory(model, recompute="full")
    hf_memory.apply_memory(model, mlp_tiles=2)  # tiles alone are fine beside HF's checkpointing
    gemma = build("gemma3", final_logit_softcapping=30.0)
    hf.apply(gemma, seqpar.Mesh())
    local = hf.shard_batch({"input_ids": data(1, 8), "labels": data(1, 8)}, seqpar.Mesh())
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        hf_memory.model_loss(gemma, local, seqpar.Mesh())


def test_apply_again_replaces_the_settings():
    model = build("llama")
    hf.apply(model, seqpar.Mesh(), mlp_tiles=4, recompute="full")
    hf.apply(model, seqpar.Mesh())
    assert hf_memory.memory_config(model).mlp_tiles == 1
    assert all("forward" not in layer.__dict__ and "forward" not in layer.mlp.__dict__
               for layer in model.model.layers)
