"""The inference planner: KV-cache bytes to the byte of seqpar.inference, splits, recommendation, command."""
from __future__ import annotations

import json

import pytest

import seqpar
from seqpar.cli import main
from seqpar.plan import GB, kv_cache_bytes, plan_inference
from tests.helpers import mesh


def test_kv_cache_bytes_per_token():
    assert kv_cache_bytes("llama3-8b", 1) == 128 * 1024  # 2 x 32 layers x 8 kv heads x 128 x 2 bytes
    assert kv_cache_bytes("llama3-8b", 1 << 20, sp=4) == 32 * 2**30  # a 1M-token cache over 4 GPUs
    assert kv_cache_bytes("llama3-8b", 1 << 20, tp=16) == kv_cache_bytes("llama3-8b", 1 << 20, tp=8)  # replicated
    assert kv_cache_bytes("llama3-8b", 1 << 20, window=4096) == kv_cache_bytes("llama3-8b", 4096)


def cache_bytes_after_prefill(degrees: dict, s: int):
    from tests.inference.test_inference import _model, _prompt

    m = mesh(**degrees)
    cache, _ = seqpar.inference.prefill(_model(m), _prompt(s))
    return cache.nbytes()


@pytest.mark.parametrize("world,degrees,s", [(4, {"sp": 4}, 40), (4, {"sp": 2, "tp": 2}, 40), (4, {"sp": 4}, 37)])
def test_the_formula_is_the_implementations(pool, world, degrees, s):
    """The fullest rank of a real prefill holds exactly what the planner predicts (the tiny model, float32)."""
    held = max(pool(world).run(cache_bytes_after_prefill, degrees, s))
    sp, tp = degrees.get("sp", 1), degrees.get("tp", 1)
    assert held == kv_cache_bytes("tiny", s, batch=2, sp=sp, tp=tp, dtype_bytes=4)


def test_a_cache_too_big_for_one_gpu_is_split():
    with pytest.raises(seqpar.ConfigError, match=r"no split of 1 GPUs .* smallest needs .* GB per GPU"):
        plan_inference("llama3-8b", 1 << 20, 1)
    p = plan_inference("llama3-8b", 1 << 20, 8)
    assert p.recommended.fits and p.recommended.total_bytes <= 80 * GB
    assert [o.tp * o.sp for o in p.options] == [8] * len(p.options)
    fits = [o.fits for o in p.options]
    assert fits == sorted(fits, reverse=True)  # fitting ones first
    assert p.reason.startswith(p.recommended.label)
    assert json.loads(json.dumps(p.to_dict()))["recommended"] == p.recommended.label


def test_weights_favour_tensor_parallel_decode():
    """70B at 128k: the weights dominate what each decoded token reads, so tp8 beats any sp split."""
    p = plan_inference("llama3-70b", 128 * 1024, 8, new_tokens=512)
    assert p.recommended.label == "tp8 x sp1"
    by = {o.label: o for o in p.options}
    assert by["tp8 x sp1"].decode_s_per_token < by["tp4 x sp2"].decode_s_per_token
    assert not by["tp1 x sp8"].fits  # 141 GB of weights on every GPU


def test_command(capsys):
    assert main(["plan", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--inference", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "Recommended: tp" in out and "KV GB" in out
    assert main(["plan", "llama3-8b", "--seq-len", "1M", "--gpus", "1", "--inference"]) == 2
    assert "smallest needs" in capsys.readouterr().err
