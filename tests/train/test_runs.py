"""A run's life: saving (every save_every steps and at the last one), rerunning a finished run, resuming,
its metrics files, and a config refused key by key before anything starts."""
from __future__ import annotations

import json

import pytest
import torch

import seqpar
from seqpar.cli import main
from seqpar.train.data import LookupTask
from seqpar.train.metrics import read_metrics
from seqpar.train.trainer import TrainConfig, train

BASE = {"model": "tiny", "seq_len": 64, "micro_batch": 2, "lr": 1e-2, "log_every": 1,
        "data": {"kind": "recall", "pairs": 4}, "eval_batches": 1}


def _toml(path, **keys) -> str:
    lines = []
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["[data]", 'kind = "recall"', "pairs = 4"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_the_last_step_is_saved_when_steps_is_not_a_multiple_of_save_every(tmp_path):
    cfg = {**BASE, "steps": 5, "save_every": 2, "checkpoint_dir": str(tmp_path)}
    train(TrainConfig.from_dict(cfg))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2", "step-4", "step-5"]
    assert (tmp_path / "latest").read_text() == "step-5"
    # save_every = 0 with a checkpoint_dir: the end of the run is still saved
    train(TrainConfig.from_dict({**cfg, "steps": 2, "save_every": 0, "checkpoint_dir": str(tmp_path / "b")}))
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-2"]


def test_a_resumed_run_continues_exactly_and_a_finished_one_trains_nothing(tmp_path):
    full = train(TrainConfig.from_dict({**BASE, "steps": 5})).losses
    cfg = {**BASE, "steps": 3, "save_every": 2, "checkpoint_dir": str(tmp_path)}
    first = train(TrainConfig.from_dict(cfg))
    assert first.losses == pytest.approx(full[:3], rel=1e-6) and first.start_step == 0
    resumed = train(TrainConfig.from_dict({**cfg, "steps": 5}))  # from step 3, the unsaved multiple
    assert resumed.start_step == 3 and resumed.losses == pytest.approx(full[3:], rel=1e-6)
    again = train(TrainConfig.from_dict({**cfg, "steps": 5}))
    assert again.finished_before and again.losses == [] and again.start_step == 5
    assert again.accuracy == pytest.approx(resumed.accuracy)  # the checkpoint's model was evaluated
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == pytest.approx(full, rel=1e-6)


def test_rerunning_a_finished_run_from_the_command_line_says_so(tmp_path, capsys):
    cfg = _toml(tmp_path / "run.toml", model="tiny", seq_len=64, micro_batch=2, steps=2, log_every=1,
                checkpoint_dir=str(tmp_path / "ck"))
    assert main(["train", cfg]) == 0
    out = capsys.readouterr().out
    assert "done: final loss" in out and "step-2" in out
    assert main(["train", cfg]) == 0  # was: IndexError on the empty loss list
    out = capsys.readouterr().out
    assert "nothing to train: the latest checkpoint" in out and "is at step 2, and steps = 2" in out


def test_metrics_are_written_as_json_lines_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard events need the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(TrainConfig.from_dict({**BASE, "steps": 3, "log_every": 2, "log_dir": str(tmp_path)}))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == pytest.approx(res.losses)
    assert all({"lr", "tokens_per_s", "elapsed_s"} <= set(r) for r in records)
    assert [("peak_mem_mb" in r) for r in records] == [False, True, True]  # logging steps and the last
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(res.losses, rel=1e-6)
    assert "train/tokens_per_s" in events.Tags()["scalars"]


def test_metrics_without_tensorboard_are_json_lines_only(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    train(TrainConfig.from_dict({**BASE, "steps": 2, "log_dir": str(tmp_path)}))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob("events.out.tfevents*"))


@pytest.mark.parametrize("overrides,message", [
    ({"data": {"kind": "recall", "pairz": 4}}, r"unknown key\(s\) \['pairz'\] in \[data\] \(kind = 'recall'\): "
                                                r"its keys are \['kind', 'pairs'\]"),
    ({"data": {"kind": "tokens", "path": "x.bin", "dtyp": "uint16"}}, r"unknown key\(s\) \['dtyp'\] in \[data\]"),
    ({"data": {"kind": "tokenz"}}, "unknown data kind 'tokenz': use one of recall, lookup, tokens"),
    ({"model": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
                "vocab_size": 128, "num_kv_heads": 2}}, r"unknown key\(s\) \['num_kv_heads'\] in \[model\]"),
    ({"strategy": "rng"}, "strategy = 'rng': use one of ring, ulysses, allgather, usp, ring_qk_av"),
    ({"layout": "zig"}, "layout = 'zig': use one of"),
    ({"data": {"kind": "tokens", "path": "/nonexistent/tokens.bin"}}, "token file '/nonexistent/tokens.bin' does "
                                                                       "not exist"),
    ({"data": {"kind": "recall", "pairs": 0}}, "pairs=0 must be >= 1"),
    ({"data": {"kind": "recall", "pairs": 100}}, "100 pairs need 100 distinct keys"),
    ({"data": {"kind": "recall", "pairs": "4"}}, "data.pairs = '4' must be an integer"),
    ({"steps": 2.5}, "steps = 2.5 must be an integer >= 1"),
    ({"save_every": -1}, "save_every = -1 must be an integer >= 0"),
])
def test_every_table_of_a_config_is_checked_key_by_key(overrides, message):
    with pytest.raises(seqpar.ConfigError, match=message):
        TrainConfig.from_dict({**BASE, **overrides})


def test_device_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(seqpar.ConfigError, match="device = 'cuda' but this machine has no CUDA device"):
        TrainConfig.from_dict({**BASE, "device": "cuda"})


def test_the_world_size_comes_from_torchrun_before_the_process_group(monkeypatch):
    """Under torchrun the group does not exist yet when the degrees are checked: WORLD_SIZE counts."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no rendezvous: the check must fail before it
    with pytest.raises(seqpar.ConfigError, match="tp=2 x ulysses=1 does not divide the world size 3"):
        train(TrainConfig.from_dict({**BASE, "tp": 2, "steps": 1}))


def test_lookup_task_needs_the_whole_context():
    task = LookupTask(vocab_size=154, seq_len=4096, pairs=4, keys=8, values=16, questions=64, repeat=8, seed=0)
    ids, labels = task.batch(0, 8)
    facts = ids >= 2 + 8 + 16
    assert ids.shape == (8, 4096) and int(facts.sum()) == 8 * 4 * 8
    where = facts.nonzero()[:, 1]
    assert where.min() < 1024 and where.max() > 2048  # planted all over the context, not next to the questions
    answered = labels != -100
    assert int(answered.sum()) == 8 * 64 and bool((answered.nonzero()[:, 1] >= 4096 - 64).all())
    assert not bool(((ids >= 10) & (ids < 26)).any())  # no answer (value token) is ever in the input
    for b in range(8):  # every question's answer is the value of the fact holding its key
        fact = {(int(t) - 26) // 16: (int(t) - 26) % 16 for t in ids[b][facts[b]]}
        assert len(fact) == 4
        for pos in answered[b].nonzero()[:, 0]:
            assert int(labels[b, pos]) - 10 == fact[int(ids[b, pos]) - 2]
