"""seqpar.integrations.hf.Trainer / SFTTrainer: N steps equal the stock trainer on one process.

Tiny Llama / Qwen2 from configs, float32, CPU gloo.  The seqpar Trainer runs on pool ranks (dp x sp);
the stock ``transformers.Trainer`` runs in this process with ``dp`` times the per-device batch, which
(with accelerate's seeded sampler) is the same global batch at every step.  Compared: every step's
logged loss (on every rank), the weight update (SGD: it is the learning-rate-weighted sum of the
gradients, so it checks them), and where asked the evaluation loss and predicted logits.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.53",
                                   reason="needs transformers>=4.53 (pip install transformers)")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

import seqpar  # noqa: E402
from seqpar.core.errors import ConfigError  # noqa: E402
from seqpar.launch.pool import WorkerError  # noqa: E402
from tests.integrations import trainer_cases as tc  # noqa: E402

RTOL = 1e-5


def assert_same_run(got: dict, ref: dict) -> None:
    """Per-step losses within RTOL, and every parameter's update within RTOL of the largest update."""
    assert len(got["losses"]) == len(ref["losses"]) > 0
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: loss {a} vs stock {b}"
    scale = max(u.abs().max().item() for u in ref["update"].values())
    assert scale > 1e-3  # the weights did move
    for name, u in ref["update"].items():
        err = (got["update"][name] - u).abs().max().item()
        assert err <= RTOL * scale, f"{name}: update differs by {err:.2e} (largest update {scale:.2e})"


def assert_same_predictions(got: dict, ref: dict) -> None:
    """Evaluation loss, and the logits of every sample's real tokens, in order (padding is garbage in both)."""
    assert abs(got["eval_loss"] - ref["eval_loss"]) <= RTOL * ref["eval_loss"]
    assert got["predictions"].shape[:1] == ref["predictions"].shape[:1] == (8,)
    for i, doc in enumerate(tc.documents(8, seed=1)):
        n = len(doc["input_ids"])
        assert torch.equal(got["label_ids"][i, :n], ref["label_ids"][i, :n])
        torch.testing.assert_close(got["predictions"][i, :n], ref["predictions"][i, :n], rtol=1e-5, atol=1e-5)


# world, degrees, arch, data, gradient accumulation, gradient checkpointing, strategy, also eval + predict,
# seqpar's memory settings (none changes the results)
CASES = {
    "w4-sp2dp2-llama-padded-ga2-eval-chunked-loss": (4, {"sp": 2}, "llama", "padded", 2, False, "ring", True,
                                                     {"loss_chunk": 7}),
    "w4-sp2dp2-qwen2-packed-checkpointing": (4, {"sp": 2}, "qwen2", "packed", 1, True, "ulysses", False, {}),
    "w2-sp2-llama-packed-ga2-checkpointing": (2, {"sp": 2}, "llama", "packed", 2, True, "ring", False, {}),
    "w4-usp-llama-padded-recompute-offload-tiles": (4, {"sp": 4, "ulysses": 2}, "llama", "padded", 1, False, "usp",
                                                    False, {"recompute": "full", "offload": True, "mlp_tiles": 3,
                                                            "loss_chunk": 5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock_trainer(pool, tmp_path, case):
    world, degrees, arch, kind, ga, gc, strategy, predict, memory = CASES[case]
    dp, batch = world // degrees["sp"], 2
    ref = tc.stock_run(arch, kind, batch * dp, str(tmp_path / "stock"), ga=ga, gc=gc, predict=predict,
                       eval_batch=4 * dp)
    results = pool(world).run(tc.seqpar_run, arch, kind, batch, str(tmp_path / "sp"), degrees, strategy,
                              ga=ga, gc=gc, predict=predict, **memory)
    got = results[0]
    assert_same_run(got, ref)
    for r in results:  # every rank logs (and reports) the global loss, not its shard's
        assert r["logged"] == got["losses"] and r["train_loss"] == got["train_loss"]
    assert abs(got["train_loss"] - ref["train_loss"]) <= RTOL * ref["train_loss"]
    if predict:
        assert_same_predictions(got, ref)


def test_one_process_equals_stock_trainer(tmp_path):
    """sp = 1 without any process group: the seqpar Trainer is the stock Trainer."""
    from seqpar.integrations.hf import Trainer

    ref = tc.stock_run("llama", "padded", 4, str(tmp_path / "stock"), ga=2, predict=True)
    got = tc.train_and_predict(Trainer, "llama", "padded", 4, str(tmp_path / "sp"), ga=2, predict=True)
    assert_same_run(got, ref)
    assert_same_predictions(got, ref)


def test_resume_from_checkpoint_and_save_model(pool, tmp_path):
    """Stop after 2 of 4 steps, resume at the same layout (model, optimizer, scheduler, data order, RNG):
    the run equals the stock Trainer's 4 uninterrupted steps; save_model writes a plain HF model."""
    ref = tc.stock_run("llama", "padded", 2, str(tmp_path / "stock"), steps=4)
    got = pool(2).run(tc.seqpar_resume, "llama", "padded", 2, str(tmp_path / "sp"), {"sp": 2}, "ring")[0]
    assert got["first"] == pytest.approx(ref["losses"], rel=RTOL)
    assert_same_run(got, ref)
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sp" / "final"))
    assert saved.config._attn_implementation != "seqpar"  # loads anywhere, without seqpar
    model = tc.tiny_model("llama")
    for name, p in saved.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[name] + got["update"][name], rtol=1e-6, atol=1e-6)


def test_sft_trainer_with_packing(pool, tmp_path):
    """TRL's SFTTrainer, BFD packing (padding-free rows): loss, update and TRL's own metrics as on one process."""
    trl = pytest.importorskip("trl", reason="needs trl (pip install trl)")
    ref = tc.sft_run(trl.SFTTrainer, 4, str(tmp_path / "stock"))
    got = pool(4).run(tc.seqpar_sft, 2, str(tmp_path / "sp"), {"sp": 2}, "ring")[0]
    assert_same_run(got, ref)
    for a, b in zip(got["metrics"], ref["metrics"]):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-7)


def test_model_init_is_prepared(tmp_path):
    """A model from model_init (built inside Trainer.__init__ and again by train()) runs seqpar attention too."""
    from seqpar.integrations.hf import Trainer

    trainer = Trainer(model_init=lambda: tc.tiny_model(), args=tc.training_args(str(tmp_path), 4, steps=1),
                      train_dataset=tc.documents(), data_collator=tc.collator("packed"))
    assert trainer.model.config._attn_implementation == "seqpar"
    trainer.train()
    assert trainer.model.config._attn_implementation == "seqpar" and len(tc.losses(trainer)) == 1


def test_mixed_precision_one_process(tmp_path):
    """bf16 autocast (the usual GPU setting; CPU autocast here): seqpar attention takes q, k, v in the autocast
    dtype as SDPA does (RoPE leaves q and k in float32), and trains like the stock Trainer within bf16 precision."""
    from seqpar.integrations.hf import Trainer

    ref = tc.stock_run("llama", "packed", 4, str(tmp_path / "stock"), args_kw={"bf16": True})
    got = tc.train_and_predict(Trainer, "llama", "packed", 4, str(tmp_path / "sp"), args_kw={"bf16": True})
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-2)


# ---- what cannot run exactly is refused, with the fix in the message ----

@pytest.mark.parametrize("case", ["cpu-without-use_cpu", "different-batches"])
def test_refused_on_every_rank(pool, tmp_path, case):
    with pytest.raises(WorkerError) as e:
        pool(2).run(tc.refused_on_every_rank, case, str(tmp_path))
    assert set(e.value.failures) == {0, 1}
    assert all(f.type_name == "ConfigError" for f in e.value.failures.values())
    assert ("use_cpu=True" if case == "cpu-without-use_cpu" else "different batches") in e.value.failures[0].message


@pytest.mark.parametrize("setting, message", [
    ({"args_kw": {"label_smoothing_factor": 0.1}}, "label_smoothing_factor"),
    ({"compute_loss_func": lambda *a, **k: 0.0}, "compute_loss_func"),
    ({"args_kw": {"torch_compile": True}}, "torch_compile"),
    ({"env": {"ACCELERATE_USE_FSDP": "true"}}, "FSDP"),
    ({"sp": 1, "mesh": "one process"}, "either mesh= or sp="),  # (DeepSpeed: TrainingArguments needs it installed)
    ({"strategy": "rign"}, "unknown strategy"),
    ({"ulysses": 2}, "ulysses"),
])
def test_unsupported_settings_are_refused(tmp_path, monkeypatch, setting, message):
    from seqpar.integrations.hf import Trainer

    setting = dict(setting)
    for k, v in setting.pop("env", {}).items():
        monkeypatch.setenv(k, v)
    args = tc.training_args(str(tmp_path), 2, **setting.pop("args_kw", {}))
    if "mesh" in setting:
        setting["mesh"] = seqpar.Mesh()
    with pytest.raises(ConfigError, match=message):
        Trainer(model=tc.tiny_model(), args=args, train_dataset=tc.documents(), data_collator=tc.collator("packed"),
                **setting)


def test_batch_without_labels_is_refused(tmp_path):
    from seqpar.integrations.hf import Trainer

    trainer = Trainer(model=tc.tiny_model(), args=tc.training_args(str(tmp_path), 2), train_dataset=tc.documents())
    batch = {"input_ids": torch.randint(3, tc.VOCAB, (2, 8))}
    with pytest.raises(ConfigError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


# ---- collated batches -> shard_batch's form (no communication) ----

def test_right_padding_is_dropped_and_left_padding_refused():
    from seqpar.integrations._hf_trainer_batch import count_targets, sequence_batch

    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    seq = sequence_batch({"input_ids": ids, "labels": ids.clone(), "attention_mask": mask,
                          "position_ids": torch.tensor([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])})
    assert "attention_mask" not in seq.tensors and not seq.flattened
    assert seq.tensors["labels"][0].tolist() == [5, 6, 7, -100, -100]
    assert seq.tensors["position_ids"][0].tolist() == [0, 1, 2, 3, 4]  # padding continues its row: no new document
    assert int(count_targets(seq)) == 2 + 4 and int(seq.real_tokens) == 8
    with pytest.raises(ConfigError, match="left-padded"):
        sequence_batch({"input_ids": ids.flip(1), "attention_mask": mask.flip(1)})


def test_packed_batches_become_documents():
    from seqpar.integrations._hf_batch import cu_seqlens_from_position_ids
    from seqpar.integrations._hf_trainer_batch import count_targets, sequence_batch

    # HF's flash-attention keywords alone give the documents; with position_ids they must agree
    ids = torch.arange(3, 12).unsqueeze(0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    seq = sequence_batch({"input_ids": ids, "labels": ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                          "max_length_q": 5, "max_length_k": 5, "seq_idx": torch.zeros(1, 9, dtype=torch.int32)})
    assert set(seq.tensors) == {"input_ids", "labels", "position_ids"}
    assert cu_seqlens_from_position_ids(seq.tensors["position_ids"]) == [0, 4, 9]
    assert int(count_targets(seq)) == 3 + 4  # the last token of each document has no target
    with pytest.raises(ConfigError, match="disagree"):
        sequence_batch({"input_ids": ids, "cu_seq_lens_q": cu, "position_ids": torch.arange(9).unsqueeze(0)})
    # rows packed differently are laid end to end, and per-token outputs go back per row
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])
    seq = sequence_batch({"input_ids": torch.arange(12).view(2, 6), "position_ids": pos})
    assert seq.flattened and cu_seqlens_from_position_ids(seq.tensors["position_ids"]) == [0, 3, 6, 8, 12]
    assert torch.equal(seq.rows(seq.tensors["input_ids"].unsqueeze(-1))[..., 0], torch.arange(12).view(2, 6))
    with pytest.raises(ConfigError, match="continues"):
        sequence_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long),
                        "position_ids": torch.tensor([[0, 1, 0, 1], [2, 3, 4, 5]])})
    with pytest.raises(ConfigError, match="cannot shard"):
        sequence_batch({"input_ids": ids, "token_type_ids": ids})
    with pytest.raises(ConfigError, match="shift_labels"):
        sequence_batch({"input_ids": ids, "shift_labels": ids})


# ---- the example under real launchers: torchrun and accelerate launch (2 processes, gloo) ----

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_example_under_launcher(tmp_path, launcher):
    """examples/hf_trainer.py, 2 ranks sharing every sequence (sp = 2), equals the stock Trainer on one process.
    accelerate launch --multi_gpu starts its ranks through torchrun on CPU too (--cpu alone runs one process)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import EXAMPLES, example

    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    else:
        pytest.importorskip("accelerate")
        cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    out_dir = tmp_path / "out"
    flags = ["--sp", "2", "--steps", "2", "--batch", "2", "--output-dir", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(seqpar.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*cmd, str(EXAMPLES / "hf_trainer.py"), *flags], capture_output=True, text=True,
                         timeout=400, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Mesh(dp=1, sp=2" in run.stdout
    got = json.loads((out_dir / "losses.json").read_text())
    ref = example("hf_trainer").reference(1, steps=2, batch=2, output_dir=str(tmp_path / "ref"))
    assert got == pytest.approx(ref, rel=RTOL)
