"""Every memory setting of ``seqpar train`` leaves the run unchanged: a few steps equal the plain run.

Activation recomputation (selective, full, full with host offload, chains of layers), tiled MLP
blocks, the chunked loss and ZeRO-2/3 (FSDP2 over dp x sp, with and without optimizer offload),
alone and together, at world 1, 2 and 4 with ring, ulysses, usp, tp and dp; and checkpoints of a
sharded run resume at another layout without it (and back).
"""
from __future__ import annotations

import pytest

import seqpar
from seqpar.train.trainer import TrainConfig, train

BASE = {"model": "tiny", "seq_len": 64, "micro_batch": 2, "steps": 3, "lr": 1e-2, "log_every": 0,
        "data": {"kind": "recall", "pairs": 4}, "eval_batches": 1}

SETTINGS = {
    "selective": {"recompute": "selective"},
    "full": {"recompute": "full"},
    "full+offload": {"recompute": "full", "offload": True},
    "chains of 2": {"recompute": "full", "checkpoint_every": 2},
    "mlp tiles": {"mlp_tiles": 3},
    "loss chunks": {"loss_chunk": 24},
    "zero 2": {"zero_stage": 2},
    "zero 3": {"zero_stage": 3},
    "zero 3 + optimizer offload": {"zero_stage": 3, "offload_optimizer": True},
    "chains of 2, zero 3": {"recompute": "full", "checkpoint_every": 2, "zero_stage": 3},
    "everything": {"recompute": "full", "offload": True, "mlp_tiles": 2, "loss_chunk": 40, "zero_stage": 3,
                   "offload_optimizer": True},
}


def losses_per_setting(layout: dict, names: list[str]) -> dict[str, list[float]]:
    """Worker task: the plain run's losses, then each setting's, at ``layout``."""
    out = {"plain": train(TrainConfig.from_dict({**BASE, **layout})).losses}
    for name in names:
        out[name] = train(TrainConfig.from_dict({**BASE, **layout, **SETTINGS[name]})).losses
    return out


@pytest.mark.parametrize("world,layout", [
    (1, {"strategy": "ring"}),
    (2, {"strategy": "ulysses"}),
    (4, {"strategy": "ring", "tp": 2}),
    (4, {"strategy": "usp", "ulysses": 2}),
    (4, {"strategy": "ring", "dp": 2}),
], ids=["world1", "ulysses2", "ring2-tp2", "usp2x2", "ring2-dp2"])
def test_each_setting_equals_the_plain_run(pool, world, layout):
    if world < 4:
        names = list(SETTINGS)
    elif "tp" in layout:  # what tp changes: tiles and the loss over tp shards, FSDP beside tp
        names = ["selective", "mlp tiles", "loss chunks", "zero 3", "everything"]
    else:
        names = ["full+offload", "zero 3", "everything"]
    res = pool(world).run(losses_per_setting, layout, names, timeout=300)[0]
    for name in names:
        assert res[name] == pytest.approx(res["plain"], rel=2e-6, abs=1e-6), name


def run_checkpointed(overrides: dict, directory: str, steps: int, save_every: int) -> list[float]:
    cfg = TrainConfig.from_dict({**BASE, **overrides, "steps": steps, "checkpoint_dir": directory,
                                 "save_every": save_every})
    return train(cfg).losses


def test_sharded_checkpoints_resume_at_another_layout(pool, tmp_path):
    full = pool(1).run(losses_per_setting, {"strategy": "ring", "steps": 6, "micro_batch": 2}, [])[0]["plain"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # saved sharded (ZeRO-3, tp=2 x ring 2), resumed plain at usp 2x2
    first = pool(4).run(run_checkpointed, {"strategy": "ring", "tp": 2, "zero_stage": 3}, a, 3, 3)[0]
    resumed = pool(4).run(run_checkpointed, {"strategy": "usp", "ulysses": 2}, a, 6, 0)[0]
    assert first + resumed == pytest.approx(full, rel=2e-6, abs=1e-6)
    # saved plain, resumed sharded at another layout (ZeRO-2 over dp 2 x ring 2, optimizer offloaded)
    pool(4).run(run_checkpointed, {"strategy": "ring", "tp": 2}, b, 3, 3)
    resumed = pool(4).run(run_checkpointed, {"strategy": "ring", "dp": 2, "micro_batch": 1, "zero_stage": 2,
                                             "offload_optimizer": True}, b, 6, 0)[0]
    assert resumed == pytest.approx(full[3:], rel=2e-6, abs=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"recompute": "some"}, "recompute='some': use one of 'none', 'selective', 'full'"),
    ({"offload": True}, "offload=True moves the checkpointed layer inputs to host memory"),
    ({"checkpoint_every": 2}, "checkpoint_every=2 chains layers"),
    ({"mlp_tiles": 0}, "mlp_tiles=0: use a positive int"),
    ({"zero_stage": 1}, "stage 1 (optimizer state only) is not implemented"),
    ({"offload_optimizer": True}, "offload_optimizer=True keeps FSDP2's sharded state in host memory"),
    ({"loss_chunk": -1}, "loss_chunk=-1"),
])
def test_bad_memory_settings_are_refused_by_name(overrides, message):
    with pytest.raises(seqpar.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_dict({**BASE, **overrides})
