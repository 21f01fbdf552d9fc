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


# world, degrees, arch, data, gradient accumulation, gradient checkpointing, strategy, also eval + predict
CASES = {
    "w4-sp2dp2-llama-padded-ga2-eval": (4, {"sp": 2}, "llama", "padded", 2, False, "ring", True),
    "w4-sp2dp2-qwen2-packed-checkpointing": (4, {"sp": 2}, "qwen2", "packed", 1, True, "ulysses", False),
    "w2-sp2-llama-packed-ga2-checkpointing": (2, {"sp": 2}, "llama", "packed", 2, True, "ring", False),
    "w4-usp-llama-padded": (4, {"sp": 4, "ulysses": 2}, "llama", "padded", 1, False, "usp", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock_trainer(pool, tmp_path, case):
    world, degrees, arch, kind, ga, gc, strategy, predict = CASES[case]
    dp, batch = world // degrees["sp"], 2
    ref = tc.stock_run(arch, kind, batch * dp, str(tmp_path / "stock"), ga=ga, gc=gc, predict=predict,
                       eval_batch=4 * dp)
    results = pool(world).run(tc.seqpar_run, arch, kind, batch, str(tmp_path / "sp"), degrees, strategy,
                              ga=ga, gc=gc, predict=predict)
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


def test_mixed_precision_one_process(tmp_path):
    """bf16 autocast (the usual GPU setting; CPU autocast here): seqpar attention takes q, k, v in the autocast
    dtype as SDPA does (RoPE leaves q and k in float32), and trains like the stock Trainer within bf16 precision."""
    from seqpar.integrations.hf import Trainer

    ref = tc.stock_run("llama", "packed", 4, str(tmp_path / "stock"), args_kw={"bf16": True})
    got = tc.train_and_predict(Trainer, "llama", "packed", 4, str(tmp_path / "sp"), args_kw={"bf16": True})
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-2)
