"""The training loop (demo and train share it): exact at any layout, checkpoints, resume, the commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqpar
from seqpar.train.checkpoint import CheckpointError, load, load_latest, save
from seqpar.cli import main
from seqpar.core.mesh import Mesh
from seqpar.models import LlamaForCausalLM
from seqpar.train.trainer import TrainConfig, train

BASE = {"model": "tiny", "seq_len": 64, "micro_batch": 2, "steps": 4, "lr": 1e-2, "log_every": 1,
        "data": {"kind": "recall", "pairs": 4}, "eval_batches": 1}


def run_train(overrides: dict, log_on_rank0_only: bool = False):
    cfg = TrainConfig.from_dict({**BASE, **overrides})
    logged = []
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    res = train(cfg, log=None if log_on_rank0_only and rank else logged.append)
    return {"losses": res.losses, "acc": res.accuracy, "logged": len(logged), "mem": res.peak_mem_mb}


@pytest.mark.parametrize("world,overrides", [
    (4, {"strategy": "ring"}), (4, {"strategy": "usp", "ulysses": 2}), (4, {"strategy": "ulysses", "tp": 2}),
    (4, {"strategy": "ring", "dp": 2}),
])
def test_loop_equals_one_process(pool, world, overrides):
    # micro_batch is per data-parallel rank: one process takes the whole global batch
    ref = run_train({"micro_batch": BASE["micro_batch"] * overrides.get("dp", 1)})
    # with dp the log callback is given on rank 0 only (what a script printing on rank 0 does): no hang
    res = pool(world).run(run_train, overrides, "dp" in overrides, timeout=120)
    assert res[0]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert res[0]["acc"] == pytest.approx(ref["acc"])
    assert res[0]["logged"] == BASE["steps"] and len(res[0]["mem"]) == world


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(seqpar.ConfigError, match=r"unknown config keys \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(seqpar.ConfigError, match="missing"):
        TrainConfig.from_dict({"model": {"hidden_size": 64}})
    bad = tmp_path / "run.toml"
    bad.write_text('model = "tiny"\nsteps = 0\n')
    assert main(["train", str(bad)]) == 2


def run_checkpointed(overrides: dict, directory: str, steps: int, save_every: int):
    cfg = TrainConfig.from_dict({**BASE, **overrides, "steps": steps, "checkpoint_dir": directory,
                                 "save_every": save_every})
    return train(cfg).losses


def test_resume_at_another_layout_gives_the_same_losses(pool, tmp_path):
    full = run_train({"steps": 6})["losses"]
    first = pool(4).run(run_checkpointed, {"tp": 2, "strategy": "ring"}, str(tmp_path), 3, 3)[0]
    assert first == pytest.approx(full[:3], rel=1e-5)
    # resume the same run at sp=4 (no tp) from step 3: the next losses are the uninterrupted ones
    resumed = pool(4).run(run_checkpointed, {"strategy": "usp", "ulysses": 2}, str(tmp_path), 6, 0)[0]
    assert resumed == pytest.approx(full[3:], rel=1e-5)


def crash_during_save(directory: str):
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    opt = torch.optim.AdamW(model.parameters())
    save(directory, model, opt, 1)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"partial")
            f.flush()
        else:
            Path(f).write_bytes(b"partial")
        os._exit(9)  # the process dies half-way through writing step 2

    torch.save = dying_save
    try:
        save(directory, model, opt, 2)
    finally:
        torch.save = real_save


def test_crash_during_save_keeps_the_previous_checkpoint(pool, tmp_path):
    with pytest.raises(seqpar.launch.WorkerError, match="exit"):
        pool(1).run(crash_during_save, str(tmp_path))
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    opt = torch.optim.AdamW(model.parameters())
    assert load_latest(tmp_path, model, opt) == 1
    assert not (tmp_path / "step-2").exists()


def test_corrupted_or_incomplete_checkpoints_are_refused(tmp_path):
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    opt = torch.optim.AdamW(model.parameters())
    path = save(tmp_path, model, opt, 5)
    for f in path.glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        load(path, model, opt)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load(path, model, opt)


@pytest.mark.slow
def test_train_command_under_torchrun(tmp_path):
    # ulysses = 2: the degrees are checked against torchrun's world (2), not the 1 seen before the group exists
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "tiny"\nseq_len = 64\nmicro_batch = 2\nsteps = 3\nlog_every = 1\n'
                   'strategy = "ulysses"\nulysses = 2\n[data]\nkind = "recall"\npairs = 4\n')
    torchrun = Path(sys.executable).with_name("torchrun")
    # --standalone: a free rendezvous port (the default 29500 may be held by another job on the machine)
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "seqpar.cli", "train",
                          str(cfg)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train step 3/3  loss " in out.stdout and "done: final loss" in out.stdout  # not a terminal: log lines
    assert out.stdout.count("done: final loss") == 1


def _steps(model, opt, n: int, seed: int = 0) -> list[float]:
    losses = []
    for i in range(n):
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed + i))
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
                                      lambda ps: torch.optim.Adagrad(ps, lr=0.1)],
                         ids=["sgd-momentum", "adamw-amsgrad", "adagrad"])
def test_resume_restores_any_optimizer_whose_state_is_shaped_like_the_parameters(tmp_path, make_opt):
    torch.manual_seed(0)
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    opt = make_opt(model.parameters())
    _steps(model, opt, 2)
    save(tmp_path, model, opt, 2)
    want = _steps(model, opt, 2, seed=2)
    torch.manual_seed(1)  # other weights: everything must come from the checkpoint
    resumed = LlamaForCausalLM("tiny", mesh=Mesh())
    opt2 = make_opt(resumed.parameters())
    assert load_latest(tmp_path, resumed, opt2) == 2
    assert _steps(resumed, opt2, 2, seed=2) == pytest.approx(want, rel=1e-6)


def test_optimizers_a_checkpoint_cannot_hold_are_refused(tmp_path):
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _steps(model, sgd, 1)
    path = save(tmp_path, model, sgd, 1)
    with pytest.raises(CheckpointError, match="holds SGD state, but the optimizer is AdamW"):
        load(path, model, torch.optim.AdamW(model.parameters()))
    lbfgs = torch.optim.LBFGS(model.parameters())
    lbfgs.state[next(model.parameters())]["n_iter"] = 3  # what LBFGS keeps: scalars, not moments
    with pytest.raises(CheckpointError, match="cannot reshard"):
        save(tmp_path, model, lbfgs, 2)


def run_with_data(path: str):
    cfg = TrainConfig.from_dict({**BASE, "data": {"kind": "tokens", "path": path, "dtype": "uint16"},
                                 "strategy": "ring", "dp": 2})
    try:
        train(cfg)
    except seqpar.ShapeError as e:
        return str(e)
    return None


def test_token_ids_outside_the_vocabulary_fail_on_every_rank(pool, tmp_path):
    """A token file made for another vocabulary: every rank names it (not the one rank holding the id)."""
    import numpy as np

    tokens = np.arange(4096, dtype=np.uint16) % 128
    tokens[1000:3000] = 300  # past the tiny model's 128 ids: the first step's windows reach them
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    msgs = pool(4).run(run_with_data, str(path), timeout=120)
    assert all(m is not None and "token ids span" in m and "vocabulary is [0, 128)" in m for m in msgs), msgs


def test_optimizer_state_the_checkpoint_lacks_is_refused_by_name(tmp_path):
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    plain = torch.optim.AdamW(model.parameters())
    _steps(model, plain, 1)
    path = save(tmp_path / "a", model, plain, 1)
    with pytest.raises(CheckpointError, match="amsgrad=False, but the optimizer has amsgrad=True"):
        load(path, model, torch.optim.AdamW(model.parameters(), amsgrad=True))
    bare = save(tmp_path / "b", model, None, 1)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load(bare, model, torch.optim.AdamW(model.parameters()))
    assert load(bare, model) == 1  # the model alone loads


def test_log_every_zero_logs_only_the_last_step():
    logged = []
    train(TrainConfig.from_dict({**BASE, "log_every": 0}), log=logged.append)
    assert [x["step"] for x in logged] == [BASE["steps"]]


def test_a_step_saved_again_is_replaced_without_a_window_of_loss(tmp_path):
    model = LlamaForCausalLM("tiny", mesh=Mesh())
    opt = torch.optim.AdamW(model.parameters())
    _steps(model, opt, 1)
    path = save(tmp_path, model, opt, 3)
    save(tmp_path, model, opt, 3)  # the same step again: replaced, nothing left aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-3"]
    path.rename(tmp_path / ".old-step-3")  # as if a re-save had crashed between its two renames
    assert load_latest(tmp_path, model, opt) == 3
