"""The planner's memory settings: what it searches, what fixed settings do, host memory, the emitted config.

The byte-level checks against the model (saved bytes per setting, the CPU peak of a training step)
are in ``test_plan_validation.py``.
"""
from __future__ import annotations

import json

import pytest

import seqpar
from seqpar.cli import main
from seqpar.core.errors import ConfigError
from seqpar.plan import MemorySettings, Settings, evaluate, plan
from seqpar.plan.emit import to_toml, train_config

SEQPAR = dict(implementation="seqpar", param_bytes=2, grad_bytes=2, optimizer_bytes=4)


def test_fixed_settings_are_kept_and_the_others_searched():
    p = plan("llama3-8b", 262144, 8, recompute="full", zero_stage=3, **SEQPAR)
    assert all(c.settings.recompute == "full" and c.settings.zero_stage == 3 for c in p.candidates if c.feasible)
    searched = {c.settings.mlp_tiles > 1 for c in plan("llama3-8b", 1 << 20, 8, **SEQPAR).candidates if c.fits}
    assert True in searched  # at 1M tokens on 8 GPUs the MLP has to be tiled somewhere
    with pytest.raises(ConfigError, match="offload keeps the checkpointed layer inputs"):
        Settings(recompute="selective", offload=True)
    with pytest.raises(ConfigError, match="settings= or keyword options, not both"):
        plan("tiny", 1024, 2, settings=Settings(), recompute="full")
    assert plan("tiny", 1024, 2, settings=Settings(recompute="full")).recommended.settings.recompute == "full"


def test_each_setting_lowers_the_peak_it_targets():
    base = dict(strategy="ring", sp=8, dp=1, **SEQPAR)
    s = 1 << 20
    plain = evaluate("llama3-8b", s, **base).memory
    chunked = evaluate("llama3-8b", s, loss_chunk=4096, **base).memory
    assert plain.peak_phase.startswith("loss") and chunked.total < plain.total  # the logits were the peak
    full = evaluate("llama3-8b", s, recompute="full", loss_chunk=4096, **base).memory
    tiled = evaluate("llama3-8b", s, recompute="full", loss_chunk=4096, mlp_tiles=32, **base).memory
    offl = evaluate("llama3-8b", s, recompute="full", loss_chunk=4096, mlp_tiles=32, offload=True, **base).memory
    assert full.total < chunked.total and tiled.total < full.total and offl.total < tiled.total
    assert offl.host == 32 * 2 * (s // 8) * 4096 and offl.activations < tiled.activations  # the layer inputs
    z3 = evaluate("llama3-8b", s, recompute="full", loss_chunk=4096, zero_stage=3, **base).memory
    assert z3.parameters + z3.optimizer < full.parameters + full.optimizer


def test_host_memory_binds_and_chains_of_layers_answer_it():
    kw = dict(strategy="ring", sp=8, recompute="full", offload=True, loss_chunk=4096, mlp_tiles=32, zero_stage=3,
              **SEQPAR)
    one = evaluate("llama3-8b", 1 << 21, **kw)
    host_gb = one.memory.host * 8 / 1e9
    tight = dict(kw, host_memory_gb=host_gb * 0.6)
    assert not evaluate("llama3-8b", 1 << 21, **tight).fits
    assert "host memory binds" in evaluate("llama3-8b", 1 << 21, **tight).reason
    best = plan("llama3-8b", 1 << 21, 8, sp=8, strategies=["ring"], **{k: v for k, v in tight.items()
                                                                     if k not in ("strategy", "sp")}).recommended
    assert best.settings.checkpoint_every > 1 and best.memory.host * 8 <= host_gb * 0.6 * 1e9


def test_memory_settings_label_and_round_trip():
    ms = MemorySettings(recompute="full", offload=True, mlp_tiles=8, loss_chunk=4096, zero_stage=3,
                        offload_optimizer=True)
    assert ms.label == "full+offload, tiles 8, loss/4096, zero3+opt-offload"
    assert MemorySettings(**ms.to_dict()) == ms


def test_train_config_is_what_the_trainer_takes():
    p = plan("tiny", 256, 2, dtype_bytes=4, implementation="seqpar", param_bytes=4, grad_bytes=4, optimizer_bytes=8,
             gpu_memory_gb=1.0)
    conf = train_config(p.model, p.recommended, p.settings, seq_len=256, device="cpu", steps=2)
    from seqpar.train import TrainConfig

    tc = TrainConfig.from_dict(conf)
    assert tc.seq_len == 256 and tc.zero_stage == p.recommended.settings.zero_stage and tc.steps == 2
    text = to_toml(conf, "a comment")
    import tomllib

    assert tomllib.loads(text) == conf
    with pytest.raises(ConfigError, match="only the 'seqpar' accounting models"):
        train_config(p.model, p.recommended, Settings(), seq_len=256)


def run_emitted(path: str) -> list[float]:
    from seqpar.train.trainer import TrainConfig, train

    return train(TrainConfig.load(path)).losses


def test_emitted_config_runs_as_written(pool, tmp_path, capsys):
    path = tmp_path / "run.toml"
    rc = main(["plan", "tiny", "--seq-len", "128", "--gpus", "2", "--gpu-memory", "0.05", "--dtype", "fp32",
               "--device", "cpu", "--steps", "2", "--emit-config", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and path.is_file()
    best = out["recommended"]
    text = path.read_text()
    assert f'recompute = "{best["settings"]["recompute"]}"' in text and "torchrun --nproc-per-node 2" in text
    losses = pool(2).run(run_emitted, str(path), timeout=300)[0]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
