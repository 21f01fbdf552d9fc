"""Activation memory of a decoder layer under tensor and sequence parallelism (saved-tensor bytes)."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.models import LlamaForCausalLM
from seqpar.core.stats import saved_activations
from tests.helpers import mesh


def layer_saved_bytes(degrees: dict, sequence_parallel: bool, seq_len: int) -> int:
    m = mesh(**degrees)
    torch.manual_seed(0)
    model = LlamaForCausalLM("tiny", mesh=m, sequence_parallel=sequence_parallel)
    local = seq_len // m.sp // (m.tp if model.sequence_parallel else 1)
    x = torch.randn(1, local, model.config.hidden_size, requires_grad=True)
    pos = seqpar.position_ids(seq_len, mesh=m)
    with saved_activations(exclude=model.parameters()) as saved:
        model.layers[0](x, pos, {"cu_seqlens": None, "seq_info": None, "window": None})
    return saved.bytes


@pytest.mark.parametrize("seq_len", [256, 1024])
def test_sequence_parallel_divides_layer_activations_by_t(pool, seq_len):
    """Korthikanti et al.: with TP+SP a layer stores sbh(34 + 5as/h)/t, i.e. 1/t of the unparallel layer.

    Our layer uses a fused attention kernel (no s^2 term), so the prediction is the ratio 1/t;
    only RoPE's cos/sin tables ([S, D], per sp shard) are not split over tp.
    """
    full = pool(1).run(layer_saved_bytes, {}, True, seq_len)[0]
    sp_on = pool(2).run(layer_saved_bytes, {"tp": 2}, True, seq_len)
    tp_only = pool(2).run(layer_saved_bytes, {"tp": 2}, False, seq_len)
    assert sp_on[0] == sp_on[1] and tp_only[0] == tp_only[1]
    assert sp_on[0] / full == pytest.approx(1 / 2, rel=0.06)
    # TP alone keeps norms, residuals and the linear inputs whole: it saves less than SP
    assert sp_on[0] < tp_only[0] < full
    # the same division by the sp degree when the sequence is split for attention instead
    ring = pool(2).run(layer_saved_bytes, {"sp": 2}, True, seq_len)
    assert ring[0] / full == pytest.approx(1 / 2, rel=0.06)


def test_layer_activations_are_linear_in_sequence_length(pool):
    """No O(S^2) tensor is saved anywhere in the layer, whatever the strategy."""
    for strategy_degrees in ({}, {"sp": 2}):
        world = 2 if strategy_degrees else 1
        small = pool(world).run(layer_saved_bytes, strategy_degrees, True, 256)[0]
        large = pool(world).run(layer_saved_bytes, strategy_degrees, True, 1024)[0]
        assert large / small == pytest.approx(4, rel=0.03)
