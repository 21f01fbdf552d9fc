"""Transformer shapes for the analytic planner (:mod:`seqpar.plan`).

:class:`ModelConfig` holds the handful of numbers that decide activation,
parameter and communication sizes of a decoder-only transformer. It can be
built directly, from a Hugging Face ``config.json``-style mapping with
:meth:`ModelConfig.from_mapping`, or looked up by name in :data:`MODELS`
through :func:`get_config`.

Registry shapes are the published ones:

* ``llama3-8b`` / ``llama3-70b``: Meta Llama 3 ``config.json``;
  ``llama3-405b``: Llama 3.1 405B ``config.json``.
* ``gpt3-175b``: Brown et al. 2020, Table 2.1 (h=12288, 96 heads, 96 layers,
  FFN 4h, GPT-2 BPE vocabulary of 50257, learned positions, 2048 context,
  biases, LayerNorm, tied embeddings). Dropout 0.1 as in the Megatron-LM
  GPT-3 recipes, so that the planner reproduces Korthikanti et al. 2022.
* ``mistral-7b``: Mistral-7B-v0.1 ``config.json``.
* ``qwen2-7b``: Qwen2-7B ``config.json``.
* ``tiny``: a test model (h=64, 4 heads, 2 kv heads, 2 layers, FFN 128,
  vocabulary 128).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from seqpar.core.errors import ConfigError, check

__all__ = ["ModelConfig", "MODELS", "get_config", "ModelLike"]

MLP_KINDS = ("swiglu", "gelu")
NORM_KINDS = ("rmsnorm", "layernorm")

# Hugging Face (and GPT-2 / Megatron) spellings accepted by from_mapping, in
# order of preference. The first spelling is the canonical name in messages.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "ffn_hidden_size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "vocab_size": ("vocab_size",),
}
_OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "num_key_value_heads": ("num_key_value_heads", "num_query_groups", "n_kv_head"),
    "head_dim": ("head_dim", "kv_channels"),
    "tied_embeddings": ("tie_word_embeddings", "tied_embeddings"),
    "rope_theta": ("rope_theta", "rotary_emb_base", "rotary_base"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx"),
    "name": ("name", "_name_or_path", "model_type"),
}
_DROPOUT_KEYS = (
    "dropout", "attention_dropout", "hidden_dropout", "attn_pdrop",
    "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
)
_BIAS_KEYS = ("bias", "attention_bias", "add_bias_linear", "mlp_bias")
_GATED_ACTS = ("silu", "swish", "swiglu", "geglu")
_PLAIN_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "gelu_approx")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (all sizes are element counts).

    Attributes:
        hidden_size: model width ``h``.
        num_attention_heads: query heads ``a``.
        num_key_value_heads: key/value heads (GQA/MQA); defaults to ``a``.
        num_layers: transformer layers ``L``.
        ffn_hidden_size: MLP inner width ``f`` (per branch for SwiGLU).
        vocab_size: vocabulary ``v``.
        head_dim: per-head width ``d``; defaults to ``h // a``.
        mlp: ``"swiglu"`` (three ``h x f`` matrices) or ``"gelu"`` (two).
        tied_embeddings: output projection shares the input embedding.
        norm: ``"rmsnorm"`` (weight only) or ``"layernorm"`` (weight + bias).
        rope_theta: RoPE base; ``None`` means learned absolute positions
            (``max_position_embeddings x h`` extra parameters).
        max_position_embeddings: context of the position table (only counted
            when ``rope_theta is None``).
        dropout: dropout probability; ``> 0`` means dropout masks are stored
            (Korthikanti et al. count them, 1 byte per element).
        bias: linear layers carry biases (GPT-2/GPT-3 style).
        name: label used in reports.
    """

    hidden_size: int
    num_attention_heads: int
    num_layers: int
    ffn_hidden_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    mlp: str = "swiglu"
    tied_embeddings: bool = False
    norm: str = "rmsnorm"
    rope_theta: float | None = 10000.0
    max_position_embeddings: int | None = None
    dropout: float = 0.0
    bias: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size", "vocab_size"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, ConfigError,
                  f"ModelConfig.{f} must be a positive int, got {v!r}")
        a = self.num_attention_heads
        kv = a if self.num_key_value_heads is None else self.num_key_value_heads
        check(isinstance(kv, int) and kv > 0, ConfigError,
              f"ModelConfig.num_key_value_heads must be a positive int, got {kv!r}")
        check(a % kv == 0, ConfigError,
              f"num_attention_heads ({a}) must be a multiple of num_key_value_heads ({kv})")
        object.__setattr__(self, "num_key_value_heads", kv)
        if self.head_dim is None:
            check(self.hidden_size % a == 0, ConfigError,
                  f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads ({a}); "
                  "pass head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // a)
        check(isinstance(self.head_dim, int) and self.head_dim > 0, ConfigError,
              f"ModelConfig.head_dim must be a positive int, got {self.head_dim!r}")
        check(self.mlp in MLP_KINDS, ConfigError, f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        check(self.norm in NORM_KINDS, ConfigError, f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        check(0.0 <= float(self.dropout) < 1.0, ConfigError, f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.rope_theta is None:
            check(self.max_position_embeddings is not None and self.max_position_embeddings > 0, ConfigError,
                  "learned positions (rope_theta=None) need max_position_embeddings")

    # -- derived sizes -----------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads (never ``None`` after construction)."""
        return int(self.num_key_value_heads)  # type: ignore[arg-type]

    @property
    def d(self) -> int:
        """Per-head width (never ``None`` after construction)."""
        return int(self.head_dim)  # type: ignore[arg-type]

    @property
    def q_dim(self) -> int:
        """Width of Q (and of the attention output): ``a * d``."""
        return self.num_attention_heads * self.d

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): ``kv_heads * d``."""
        return self.kv_heads * self.d

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], name: str | None = None) -> ModelConfig:
        """Build from a Hugging Face ``config.json``-style mapping.

        Required (any one spelling each): ``hidden_size``;
        ``num_attention_heads``; ``num_hidden_layers`` or ``num_layers``;
        ``intermediate_size`` or ``ffn_hidden_size``; ``vocab_size``.
        Optional: ``num_key_value_heads`` (default: heads), ``head_dim``,
        ``hidden_act`` (``silu`` -> SwiGLU, ``gelu*``/``relu`` -> plain MLP) or
        ``mlp``, ``norm`` or the presence of ``rms_norm_eps`` /
        ``layer_norm_eps``, ``tie_word_embeddings``, ``rope_theta``,
        ``max_position_embeddings``, dropout probabilities, ``attention_bias``.
        GPT-2 spellings (``n_embd``, ``n_head``, ``n_layer``, ``n_inner``) are
        accepted too; GPT-2 style mappings default to GELU, LayerNorm,
        biases, learned positions and tied embeddings.

        Raises:
            ConfigError: naming every missing required key.
        """
        if isinstance(d, ModelConfig):
            return d
        check(isinstance(d, Mapping), ConfigError, f"expected a mapping, got {type(d).__name__}")
        gpt2_style = "n_embd" in d or "n_head" in d
        kw = _sizes(d, gpt2_style)
        kw["mlp"] = _mlp_kind(d, gpt2_style)
        kw.update(_style_defaults(d, kw, gpt2_style))
        if name is not None:
            kw["name"] = name
        elif "name" in kw:
            kw["name"] = str(kw["name"])
        return cls(**kw)


def _pick(d: Mapping[str, Any], spellings: tuple[str, ...]) -> Any:
    """The value of the first spelling ``d`` holds (and is not None), else None."""
    for k in spellings:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _sizes(d: Mapping[str, Any], gpt2_style: bool) -> dict[str, Any]:
    """The required and optional keys of a mapping, integers checked (ConfigError naming every missing key)."""
    kw: dict[str, Any] = {}
    missing = []
    for field_name, spellings in _REQUIRED_KEYS.items():
        v = _pick(d, spellings)
        if v is None and field_name == "ffn_hidden_size" and gpt2_style and _pick(d, _REQUIRED_KEYS["hidden_size"]):
            v = 4 * int(_pick(d, _REQUIRED_KEYS["hidden_size"]))  # GPT-2: n_inner=None means 4h
        if v is None:
            missing.append(" or ".join(repr(s) for s in spellings))
        else:
            kw[field_name] = v
    if missing:
        raise ConfigError("model mapping is missing required key(s): " + "; ".join(missing))
    for field_name, spellings in _OPTIONAL_KEYS.items():
        v = _pick(d, spellings)
        if v is not None:
            kw[field_name] = v
    for f in ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size", "vocab_size",
              "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if f in kw:
            try:
                kw[f] = int(kw[f])
            except (TypeError, ValueError):
                raise ConfigError(f"model mapping key for {f} must be an integer, got {kw[f]!r}") from None
    return kw


def _mlp_kind(d: Mapping[str, Any], gpt2_style: bool) -> str:
    """``mlp`` as given, or from the activation function (gated: SwiGLU; GELU/ReLU: a plain MLP)."""
    if "mlp" in d:
        return str(d["mlp"]).lower()
    act = _pick(d, ("hidden_act", "activation_function", "hidden_activation", "activation"))
    if act is None:
        return "gelu" if gpt2_style else "swiglu"
    act = str(act).lower()
    if act in _GATED_ACTS or "glu" in act:
        return "swiglu"
    if act in _PLAIN_ACTS or act.startswith("gelu"):
        return "gelu"
    raise ConfigError(f"unknown hidden_act {act!r}; pass mlp='swiglu' or 'gelu'")


def _style_defaults(d: Mapping[str, Any], kw: dict[str, Any], gpt2_style: bool) -> dict[str, Any]:
    """Norm, tied embeddings, positions, dropout and biases: given, or the GPT-2 family's defaults."""
    out: dict[str, Any] = {}
    if "norm" in d:
        out["norm"] = str(d["norm"]).lower()
    elif "rms_norm_eps" in d:
        out["norm"] = "rmsnorm"
    elif any(k in d for k in ("layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon")) or gpt2_style:
        out["norm"] = "layernorm"
    if "tied_embeddings" in kw or gpt2_style:
        out["tied_embeddings"] = bool(kw.get("tied_embeddings", True))
    if "rope_theta" in kw:
        out["rope_theta"] = float(kw["rope_theta"])
    elif gpt2_style:
        out["rope_theta"] = None
        if "max_position_embeddings" not in kw:
            out["max_position_embeddings"] = 1024
    drops = [float(d[k]) for k in _DROPOUT_KEYS
             if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)]
    if drops:
        out["dropout"] = max(drops)
    bias = _pick(d, _BIAS_KEYS)
    if bias is not None:
        out["bias"] = bool(bias)
    elif gpt2_style:
        out["bias"] = True
    return out


def _model(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, **kw)


#: Registered model shapes, by lower-case name.
MODELS: dict[str, ModelConfig] = {
    "tiny": _model("tiny", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_layers=2,
                   ffn_hidden_size=128, vocab_size=128),
    "llama3-8b": _model("llama3-8b", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                        num_layers=32, ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192),
    "llama3-70b": _model("llama3-70b", hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                         num_layers=80, ffn_hidden_size=28672, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=8192),
    "llama3-405b": _model("llama3-405b", hidden_size=16384, num_attention_heads=128, num_key_value_heads=8,
                          num_layers=126, ffn_hidden_size=53248, vocab_size=128256, rope_theta=500000.0,
                          max_position_embeddings=131072),
    "gpt3-175b": _model("gpt3-175b", hidden_size=12288, num_attention_heads=96, num_key_value_heads=96,
                        num_layers=96, ffn_hidden_size=4 * 12288, vocab_size=50257, mlp="gelu",
                        norm="layernorm", tied_embeddings=True, rope_theta=None,
                        max_position_embeddings=2048, dropout=0.1, bias=True),
    "mistral-7b": _model("mistral-7b", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         num_layers=32, ffn_hidden_size=14336, vocab_size=32000, rope_theta=10000.0,
                         max_position_embeddings=32768),
    "qwen2-7b": _model("qwen2-7b", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                       num_layers=28, ffn_hidden_size=18944, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768),
}

ModelLike = str | Mapping[str, Any] | ModelConfig


def get_config(name_or_mapping: ModelLike) -> ModelConfig:
    """Resolve a registered name, a HF-style mapping or a :class:`ModelConfig`.

    Names are matched case-insensitively, with ``_`` and ``-`` equivalent.

    Raises:
        ConfigError: unknown name (the message lists the known ones), or a
            mapping with missing keys.
    """
    if isinstance(name_or_mapping, ModelConfig):
        return name_or_mapping
    if isinstance(name_or_mapping, str):
        key = name_or_mapping.strip().lower().replace("_", "-")
        if key in MODELS:
            return MODELS[key]
        raise ConfigError(f"unknown model {name_or_mapping!r}; known models: {', '.join(sorted(MODELS))}")
    if isinstance(name_or_mapping, Mapping):
        return ModelConfig.from_mapping(name_or_mapping)
    raise ConfigError(
        f"model must be a registered name, a mapping or a ModelConfig, got {type(name_or_mapping).__name__}")


# keep the field list importable for callers that build configs generically
FIELD_NAMES = tuple(f.name for f in fields(ModelConfig))
