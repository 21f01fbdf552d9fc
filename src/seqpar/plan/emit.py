"""A ``seqpar train`` config for a planned layout: what the planner recommends, as the trainer runs it.

:func:`train_config` turns a :class:`~seqpar.plan.Plan`'s recommendation into the keys of
:class:`seqpar.train.TrainConfig` (degrees, strategy, memory settings, sequence length, dtype);
:func:`to_toml` writes them.  Pure Python: the planner imports nothing above the configs.
Refused by name: plans the trainer cannot run as planned (the ``paper`` accounting, which models
another model's activations; ZeRO stage 1; a model dtype the trainer has no name for).
"""
from __future__ import annotations

import json
from typing import Any

from seqpar.core.configs import MODELS, ModelConfig
from seqpar.core.errors import ConfigError, check
from seqpar.plan.candidates import Candidate
from seqpar.plan.settings import Settings

__all__ = ["train_config", "to_toml", "TRAIN_DTYPES"]

#: activation bytes -> the trainer's dtype name
TRAIN_DTYPES = {2: "bfloat16", 4: "float32", 8: "float64"}
_HF_KEYS = {"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
            "num_key_value_heads": "num_key_value_heads", "num_layers": "num_hidden_layers",
            "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size", "head_dim": "head_dim",
            "tied_embeddings": "tie_word_embeddings", "rope_theta": "rope_theta"}


def _model_entry(cfg: ModelConfig) -> str | dict[str, Any]:
    if MODELS.get(cfg.name) == cfg:
        return cfg.name
    check(cfg.mlp == "swiglu" and cfg.norm == "rmsnorm" and not cfg.bias and cfg.rope_theta is not None, ConfigError,
          f"{cfg.name}: seqpar train runs a Llama-style model (SwiGLU, RMSNorm, RoPE, no biases); this shape "
          f"(mlp={cfg.mlp!r}, norm={cfg.norm!r}, bias={cfg.bias}) cannot be emitted as a train config")
    return {hf: getattr(cfg, f) for f, hf in _HF_KEYS.items() if getattr(cfg, f) is not None}


def train_config(cfg: ModelConfig, best: Candidate, st: Settings, *, seq_len: int, device: str = "cuda",
                 steps: int = 100) -> dict[str, Any]:
    """The :class:`seqpar.train.TrainConfig` keys that run ``best`` (one micro-batch per step).

    ``torchrun --nproc-per-node`` (times nodes) must give ``tp * sp * dp`` processes; ``sp`` is
    what the world leaves after ``tp`` and ``dp``.  The data is the synthetic recall task (replace
    ``[data]`` with a token file for real runs).
    """
    check(st.implementation == "seqpar", ConfigError,
          "a train config runs seqpar's own model, which only the 'seqpar' accounting models: plan with "
          "implementation='seqpar' (seqpar plan --accounting seqpar)")
    ms = best.settings
    check(ms.zero_stage in (0, 2, 3), ConfigError,
          f"zero_stage={ms.zero_stage}: seqpar train runs ZeRO 0, 2 or 3; plan with another zero stage")
    check(st.dtype_bytes in TRAIN_DTYPES, ConfigError,
          f"dtype_bytes={st.dtype_bytes}: seqpar train runs {sorted(TRAIN_DTYPES.values())}")
    check(st.param_bytes == st.grad_bytes == st.dtype_bytes and st.optimizer_bytes in (0, 2 * st.dtype_bytes),
          ConfigError, f"seqpar train keeps weights, gradients and AdamW's two moments in the model dtype "
          f"({st.dtype_bytes} + {st.dtype_bytes} + {2 * st.dtype_bytes} bytes per parameter); the plan assumed "
          f"{st.param_bytes} + {st.grad_bytes} + {st.optimizer_bytes}")
    strategy = best.strategy if best.strategy not in ("none", "megatron") else "ring"
    ulysses = best.sp if best.strategy == "ulysses" else (best.ulysses if best.strategy == "usp" else 1)
    out: dict[str, Any] = {
        "model": _model_entry(cfg), "strategy": strategy, "layout": "zigzag", "tp": best.tp, "ulysses": ulysses,
        "dp": best.dp, "sequence_parallel": st.sequence_parallel, "seq_len": best.padded_len or seq_len,
        "micro_batch": st.micro_batch, "steps": steps, "dtype": TRAIN_DTYPES[st.dtype_bytes], "device": device,
        "log_every": 1 if steps <= 20 else 10, "eval_batches": 1,
        "recompute": ms.recompute, "offload": ms.offload, "checkpoint_every": ms.checkpoint_every,
        "mlp_tiles": ms.mlp_tiles, "loss_chunk": ms.loss_chunk, "zero_stage": ms.zero_stage,
        "offload_optimizer": ms.offload_optimizer,
        "data": {"kind": "recall", "pairs": max(1, min(8, (cfg.vocab_size - 2) // 2, (seq_len - 1) // 4))},
    }
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string


def to_toml(config: dict[str, Any], comment: str = "") -> str:
    """TOML text of a flat config with sub-tables (``model`` / ``data`` as tables when they are dicts)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
