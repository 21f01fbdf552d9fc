"""Tests of seqpar.configs: the model registry and HF-style mappings."""
from __future__ import annotations

import json

import pytest

from seqpar.core.configs import MODELS, ModelConfig, get_config
from seqpar.core.errors import ConfigError

LLAMA3_8B_HF = {  # meta-llama/Meta-Llama-3-8B config.json (abridged)
    "architectures": ["LlamaForCausalLM"],
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def test_registry_has_required_models():
    for name in ("tiny", "llama3-8b", "llama3-70b", "llama3-405b", "gpt3-175b", "mistral-7b", "qwen2-7b"):
        assert name in MODELS
        assert get_config(name) is MODELS[name]


@pytest.mark.parametrize(
    "name, h, a, kv, layers, ffn, vocab",
    [
        ("tiny", 64, 4, 2, 2, 128, 128),
        ("llama3-8b", 4096, 32, 8, 32, 14336, 128256),
        ("llama3-70b", 8192, 64, 8, 80, 28672, 128256),
        ("llama3-405b", 16384, 128, 8, 126, 53248, 128256),
        ("gpt3-175b", 12288, 96, 96, 96, 4 * 12288, 50257),
        ("mistral-7b", 4096, 32, 8, 32, 14336, 32000),
        ("qwen2-7b", 3584, 28, 4, 28, 18944, 152064),
    ],
)
def test_published_shapes(name, h, a, kv, layers, ffn, vocab):
    c = get_config(name)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_layers,
            c.ffn_hidden_size, c.vocab_size) == (h, a, kv, layers, ffn, vocab)
    assert c.head_dim == h // a


def test_gpt3_is_gelu_layernorm_tied():
    c = get_config("gpt3-175b")
    assert c.mlp == "gelu" and c.norm == "layernorm" and c.tied_embeddings
    assert c.rope_theta is None and c.max_position_embeddings == 2048
    assert c.dropout > 0  # Korthikanti et al. count dropout masks
    llama = get_config("llama3-8b")
    assert llama.mlp == "swiglu" and llama.norm == "rmsnorm" and not llama.tied_embeddings
    assert llama.rope_theta == 500000.0


def test_name_lookup_is_forgiving():
    assert get_config("LLAMA3-8B") is MODELS["llama3-8b"]
    assert get_config("llama3_8b") is MODELS["llama3-8b"]


def test_unknown_name_lists_known():
    with pytest.raises(ConfigError) as e:
        get_config("llama9-1t")
    msg = str(e.value)
    assert "llama9-1t" in msg
    for name in MODELS:
        assert name in msg


def test_unknown_type():
    with pytest.raises(ConfigError):
        get_config(42)  # type: ignore[arg-type]


def test_from_mapping_hf_llama_matches_registry():
    c = get_config(LLAMA3_8B_HF)
    ref = MODELS["llama3-8b"]
    for f in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_layers", "ffn_hidden_size",
              "vocab_size", "head_dim", "mlp", "norm", "tied_embeddings", "rope_theta"):
        assert getattr(c, f) == getattr(ref, f), f
    assert c.dropout == 0.0


def test_from_mapping_alternate_keys_and_defaults():
    c = ModelConfig.from_mapping({"hidden_size": 256, "num_attention_heads": 8, "num_layers": 3,
                                  "ffn_hidden_size": 1024, "vocab_size": 1000})
    assert c.num_layers == 3 and c.ffn_hidden_size == 1024
    assert c.num_key_value_heads == 8  # defaults to heads
    assert c.head_dim == 32  # derived
    c2 = ModelConfig.from_mapping({"hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 3,
                                   "intermediate_size": 1024, "vocab_size": 1000, "head_dim": 64,
                                   "hidden_act": "gelu", "layer_norm_eps": 1e-5})
    assert c2.head_dim == 64 and c2.mlp == "gelu" and c2.norm == "layernorm"


def test_from_mapping_gpt2_style():
    c = ModelConfig.from_mapping({"n_embd": 768, "n_head": 12, "n_layer": 12, "vocab_size": 50257,
                                  "n_positions": 1024, "resid_pdrop": 0.1})
    assert c.hidden_size == 768 and c.ffn_hidden_size == 4 * 768
    assert c.mlp == "gelu" and c.norm == "layernorm" and c.tied_embeddings and c.bias
    assert c.rope_theta is None and c.max_position_embeddings == 1024 and c.dropout == 0.1


@pytest.mark.parametrize("drop", ["hidden_size", "num_attention_heads", "num_hidden_layers",
                                  "intermediate_size", "vocab_size"])
def test_from_mapping_missing_key_is_named(drop):
    d = {k: v for k, v in LLAMA3_8B_HF.items() if k != drop}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_mapping(d)
    assert drop in str(e.value)
    assert "missing" in str(e.value)


def test_from_mapping_names_every_missing_key():
    with pytest.raises(ConfigError) as e:
        get_config({"hidden_size": 64})
    msg = str(e.value)
    for k in ("num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        assert k in msg


def test_validation():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3, num_layers=1,
                    ffn_hidden_size=128, vocab_size=10)
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig(hidden_size=65, num_attention_heads=4, num_layers=1, ffn_hidden_size=128, vocab_size=10)
    with pytest.raises(ConfigError, match="mlp"):
        ModelConfig(hidden_size=64, num_attention_heads=4, num_layers=1, ffn_hidden_size=128, vocab_size=10,
                    mlp="relu2")
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig(hidden_size=0, num_attention_heads=4, num_layers=1, ffn_hidden_size=128, vocab_size=10)
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_mapping({**LLAMA3_8B_HF, "hidden_act": "mystery"})


def test_config_is_frozen_and_json_able():
    c = get_config("tiny")
    with pytest.raises(Exception):
        c.hidden_size = 1  # type: ignore[misc]
    assert json.loads(json.dumps(c.to_dict()))["hidden_size"] == 64
    assert c.q_dim == 64 and c.kv_dim == 32
