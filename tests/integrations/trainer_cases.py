"""Shared pieces of the Trainer tests: tiny models, data, collators, and the runs the ranks execute.

Module-level, so the worker pool can run them (tasks are pickled by reference).
"""
from __future__ import annotations

import os

import torch

VOCAB = 96
#: tiny configs (GQA: 4 heads, 2 kv heads); float32
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=VOCAB, max_position_embeddings=512, attention_dropout=0.0, pad_token_id=0)
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny_model(arch: str = "llama", seed: int = 0):
    import transformers

    cfg_name, model_name = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**SMALL, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).float()


def tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t3" ... "t95"), pad id 0, built locally."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                   pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def documents(n: int = 32, seed: int = 0, lo: int = 5, hi: int = 40) -> list[dict[str, list[int]]]:
    """``n`` token sequences of random lengths in [lo, hi) (ids >= 3: never the pad id)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, VOCAB, (n_,), generator=g).tolist()} for n_ in lens]


def collator(kind: str):
    """``padded``: right padding with an attention mask; ``packed``: HF's flattening (position ids restart)."""
    import transformers

    if kind == "packed":
        return transformers.DataCollatorWithFlattening()
    return transformers.DataCollatorForLanguageModeling(tokenizer(), mlm=False)


def training_args(out: str, batch: int, *, ga: int = 1, gc: bool = False, steps: int = 3, eval_batch: int = 4, **kw):
    """SGD (the update is the gradient: weights compare tightly), default clipping and linear decay."""
    from transformers import TrainingArguments

    defaults = dict(learning_rate=0.05, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
                    use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=eval_batch,
                             gradient_accumulation_steps=ga, activation_checkpointing=gc, max_steps=steps,
                             **{**defaults, **kw})


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LogRecorder:
    """A TrainerCallback recording every ``on_log`` on this rank (what report_to integrations receive)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.logs: list[dict] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))

        return _Recorder()


def train_and_predict(trainer_cls, arch: str, kind: str, batch: int, out: str, *, ga: int = 1, gc: bool = False,
                      steps: int = 3, eval_batch: int = 4, predict: bool = False, args_kw: dict | None = None,
                      **extra):
    """Train ``steps`` steps (then evaluate and predict when ``predict``); what the test compares."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # else accelerate sizes threads per rank itself
    model = tiny_model(arch)
    init = weights(model)
    recorder = LogRecorder()
    args = training_args(out, batch, ga=ga, gc=gc, steps=steps, eval_batch=eval_batch, **(args_kw or {}))
    trainer = trainer_cls(model=model, args=args, train_dataset=documents(), data_collator=collator(kind),
                          callbacks=[recorder], **extra)
    trainer.train()
    result = {"losses": losses(trainer), "update": {k: v - init[k] for k, v in weights(model).items()},
              "logged": [r["loss"] for r in recorder.logs if "loss" in r],
              "train_loss": trainer.state.log_history[-1]["train_loss"]}
    if predict:
        ev = documents(8, seed=1)
        result["eval_loss"] = trainer.evaluate(ev)["eval_loss"]
        pred = trainer.predict(ev)
        result["predictions"] = torch.as_tensor(pred.predictions)
        result["label_ids"] = torch.as_tensor(pred.label_ids)
    return result


def seqpar_run(arch: str, kind: str, batch: int, out: str, degrees: dict, strategy: str, **kw):
    """Worker: the seqpar Trainer on this rank; rank 0 returns its result, the others their logged losses."""
    import torch.distributed as dist

    from seqpar.integrations.hf import Trainer

    res = train_and_predict(Trainer, arch, kind, batch, out, strategy=strategy, **degrees, **kw)
    if dist.get_rank() != 0:
        res = {"losses": res["losses"], "logged": res["logged"], "train_loss": res["train_loss"]}
    return res


def stock_run(arch: str, kind: str, batch: int, out: str, **kw):
    """The stock transformers.Trainer on this (single) process."""
    from transformers import Trainer

    return train_and_predict(Trainer, arch, kind, batch, out, **kw)


def seqpar_resume(arch: str, kind: str, batch: int, out: str, degrees: dict, strategy: str, steps: int = 4):
    """Worker: train ``steps`` steps saving every 2, then a new Trainer resumes from the first checkpoint and
    finishes; returns the resumed run (rank 0) and saves its model with save_model."""
    import torch.distributed as dist

    from seqpar.integrations.hf import Trainer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = training_args(out, batch, steps=steps, save_strategy="steps", save_steps=2)
    first = Trainer(model=tiny_model(arch), args=args, train_dataset=documents(), data_collator=collator(kind),
                    strategy=strategy, **degrees)
    first.train()
    model = tiny_model(arch)
    init = weights(model)
    second = Trainer(model=model, args=args, train_dataset=documents(), data_collator=collator(kind),
                     strategy=strategy, **degrees)
    second.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    second.save_model(os.path.join(out, "final"))
    res = {"losses": losses(second), "update": {k: v - init[k] for k, v in weights(model).items()},
           "resumed_at": second.state.log_history[-1].get("step"), "first": losses(first)}
    return res if dist.get_rank() == 0 else None


def sft_run(trainer_cls, batch: int, out: str, **extra):
    """TRL's SFTTrainer with BFD packing (padding-free rows, position ids restarting per document)."""
    import datasets
    from trl import SFTConfig

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=3, learning_rate=0.05, optim="sgd",
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                     packing=True, max_length=48, bf16=False)
    model = tiny_model("llama")
    init = weights(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(documents(48)),
                          processing_class=tokenizer(), **extra)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses(trainer), "update": {k: v - init[k] for k, v in weights(model).items()},
            "metrics": [{k: h[k] for k in ("entropy", "mean_token_accuracy", "num_tokens")} for h in logs]}


def seqpar_sft(batch: int, out: str, degrees: dict, strategy: str):
    import torch.distributed as dist

    from seqpar.integrations.hf import SFTTrainer

    res = sft_run(SFTTrainer, batch, out, strategy=strategy, **degrees)
    return res if dist.get_rank() == 0 else None


def refused_on_every_rank(case: str, out: str):
    """Worker: a misconfigured Trainer raises ConfigError on every rank (before the model communicates)."""
    import torch.distributed as dist

    from seqpar.integrations.hf import Trainer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if case == "cpu-without-use_cpu":
        args = training_args(out, 2, use_cpu=False)
        Trainer(model=tiny_model(), args=args, train_dataset=documents(), data_collator=collator("packed"), sp=2)
    elif case == "different-batches":  # an unseeded pipeline: each rank of the sp group reads other samples
        trainer = Trainer(model=tiny_model(), args=training_args(out, 2), train_dataset=documents(seed=dist.get_rank()),
                          data_collator=collator("packed"), sp=2)
        trainer.train()
    return "not refused"
