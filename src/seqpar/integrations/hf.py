"""Sequence-parallel training of stock Hugging Face ``transformers`` causal LMs.

Recipe (every rank; ``batch`` is this data-parallel rank's full sequences, the same
on every rank of its sequence-parallel group)::

    mesh = seqpar.init(sp=4, dp=2)                      # torchrun's environment
    model = AutoModelForCausalLM.from_config(config)     # Llama, Mistral, Qwen2, Qwen3, ...
    hf.apply(model, mesh, strategy="ring")               # attention -> seqpar.attention
    ddp = DistributedDataParallel(model, process_group=mesh.dp_sp_group)
    local = hf.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, mesh)
    labels = local.pop("labels"); del local["shift_labels"]   # shifted before sharding
    out = ddp(**local)                                   # local logits [B, S/sp, V]
    loss = hf.causal_lm_loss(out.logits, labels, mesh)
    loss.loss.backward()                                 # DDP averages grads over dp x sp: exact

How each piece of the HF model is made exact on a sequence shard:

* **Attention** goes through transformers' attention-implementation registry:
  ``AttentionInterface.register("seqpar", fn)`` and
  ``model.set_attn_implementation("seqpar")``.  HF calls ``fn(module, query, key,
  value, attention_mask, scaling=, dropout=, sliding_window=, **kwargs)`` with
  ``[B, H, S_local, D]`` tensors; ``fn`` hands them to :func:`seqpar.attention` as
  BSHD with the module's scaling, K/V at the kv-head count (GQA is never
  repeated), causal from ``module.is_causal``, and HF's sliding window (key
  ``j`` visible to query ``i`` iff ``i - sliding_window < j <= i``, i.e.
  ``window=(sliding_window - 1, 0)``) on the layers that have one.
* **Masks.**  transformers builds masks through a *separate* registry
  (``AttentionMaskInterface``).  "seqpar" is deliberately not registered there,
  so ``create_causal_mask`` / ``create_sliding_window_causal_mask`` exit early
  and return the user's mask unchanged (None): HF never builds a dense
  ``[S_local, S_local]`` causal mask from local lengths, which would be wrong
  (seqpar.attention applies the causal mask over *global* positions itself).
  A forward pre-hook drops an all-ones ``attention_mask`` and refuses a padding
  mask (use packing); ``fn`` refuses any mask that still reaches it.
* **RoPE** is computed by HF from ``position_ids``: :func:`shard_batch` gives
  every rank the global positions of its tokens (per-document positions when
  packed), so rotary embeddings match the unsharded model.
* **Packing / padding**: :func:`shard_batch` returns a ``seqpar_info`` keyword
  (a :class:`~seqpar.packing.SeqInfo`); HF forwards every extra keyword of
  ``model(**local)`` through the decoder layers to ``fn``, which passes it to
  seqpar.attention as ``seq_info``.
* **Loss**: labels are shifted before sharding (see :func:`shard_batch`);
  :func:`causal_lm_loss` gives the exact global token mean.

Inference: :func:`seqpar.inference.generate` (``prefill``, ``decode_step``) runs a model
prepared here with a KV cache sharded over the sequence: apply() registers the Hugging Face
models' inference adapter (:mod:`seqpar.integrations.hf_inference`), and :func:`hf_attention`
hands each layer's q/k/v to the cache step that inference passes as ``seqpar_cache``.

Refused with a :class:`~seqpar.errors.ConfigError` naming what is missing:
padding attention masks, ``output_attentions=True``, HF's own KV caches and ``model.generate``,
attention dropout, logit soft-capping, attention sinks or position biases, RoPE whose
frequencies depend on the longest position in the batch (``dynamic``, ``longrope``),
bidirectional sliding windows, layer types other than full/sliding attention
(linear attention, Mamba, chunked), encoder-decoders, architectures whose
attention does not go through ``AttentionInterface``, and tensor parallelism.

After every forward a hook checks that each decoder layer's attention called the
seqpar function (else a ConfigError: the model mixes tokens some other way).  A
model prepared by apply() survives ``copy.deepcopy`` and ``save_pretrained``, but
not pickling of the whole module (its hooks are closures): save the state dict.

Needs transformers >= 4.53 (masks built in ``masking_utils``); tested with 4.53.3,
4.57.6 and 5.24.0 (Llama, Mistral, Qwen2, Qwen3, Gemma3).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..attention import attention
from ..core.errors import ConfigError, check
from ..core.layout import get_layout
from ..core.mesh import Mesh, resolve_mesh
from ..core.strategies import SP_STRATEGIES
from ..train.loss import LossOutput, causal_lm_loss, shift_labels
from ._hf_batch import INFO_KEY, batch_info, check_mesh, cu_seqlens_from_position_ids, shard_batch

__all__ = ["apply", "shard_batch", "causal_lm_loss", "LossOutput", "shift_labels", "cu_seqlens_from_position_ids",
           "hf_attention", "settings", "HFSettings", "ATTN_IMPLEMENTATION", "CACHE_KEY"]

#: names renamed in 0.2, kept one release: old name -> (new name, object)
_RENAMED = {"sp_causal_lm_loss": ("causal_lm_loss", causal_lm_loss), "SPLoss": ("LossOutput", LossOutput)}

#: the name under which the attention function is registered with transformers
ATTN_IMPLEMENTATION = "seqpar"
#: the keyword under which seqpar.inference hands its cache step (:class:`seqpar.inference.CacheStep`) down to
#: the attention function, through the model's forward
CACHE_KEY = "seqpar_cache"
#: first transformers release whose mask builders (masking_utils) skip unknown attention implementations
MIN_TRANSFORMERS = (4, 53)

#: RoPE variants whose frequencies HF recomputes from the largest position in each forward: each sequence
#: shard would see a different largest position, so its tokens would be rotated unlike one device's
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")
#: layer types (config.layer_types) whose attention seqpar reproduces exactly
_LAYER_TYPES = ("full_attention", "sliding_attention")
#: keywords HF may pass to an attention function that change what attention computes and seqpar cannot do
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping (config.attn_logit_softcapping must be None)",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "additive position biases (T5/ALiBi style)",
    "cu_seq_lens_q": "HF's local flash-attention packing (cu_seq_lens_q/k): shard packed batches with "
                     "seqpar.integrations.hf.shard_batch(position_ids=...) instead",
    "cu_seq_lens_k": "HF's local flash-attention packing (cu_seq_lens_q/k): shard packed batches with "
                     "seqpar.integrations.hf.shard_batch(position_ids=...) instead",
}


@dataclass(eq=False)
class HFSettings:
    """What :func:`apply` chose for one model; stored on every submodule (read it with :func:`settings`).

    Attributes:
        mesh, strategy, layout: as given to apply().
        name: the model's class, for messages.
        expected_calls: attention calls per forward (decoder layers), when known.
        calls: attention calls in the current forward (reset by the forward pre-hook, checked after it).
        hooks: the forward hooks apply() installed (removed when apply() is called again).
    """

    mesh: Mesh
    strategy: str
    layout: str
    name: str
    expected_calls: int | None
    calls: int = 0
    hooks: list[Any] = field(default_factory=list)

    def __deepcopy__(self, memo: dict[int, Any]) -> HFSettings:
        return self  # process groups cannot be copied: a deep copy of the model shares its mesh and hooks' state


#: the attribute under which apply() stores the HFSettings on the model and each of its submodules
_SETTINGS_ATTR = "_seqpar_settings"


def settings(model: nn.Module) -> HFSettings | None:
    """What :func:`apply` stored on ``model`` (or on any of its submodules); None for a non-HF model.

    Raises a ConfigError for a transformers model that apply() has not prepared.  No communication.
    """
    s = getattr(model, _SETTINGS_ATTR, None)
    if isinstance(s, HFSettings):
        return s
    check(not type(model).__module__.startswith("transformers."), ConfigError,
          f"{type(model).__name__} is a Hugging Face model not prepared for sequence parallelism: call "
          f"seqpar.integrations.hf.apply(model, mesh, strategy=...) first")
    return None


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 sliding_window: int | None = None, is_causal: bool | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
    """The seqpar attention function transformers calls (registered as ``"seqpar"``).

    Args:
        module: the HF attention module (``is_causal``, ``layer_idx``, and the settings apply() put on it).
        query: ``[B, H, S/sp, D]``; key, value: ``[B, Hkv, S/sp, D]`` (this rank's tokens).
        attention_mask: must be None (see the module docs: HF builds no mask for "seqpar").
        scaling: softmax scale (the module's; None = 1/sqrt(D)).
        dropout: must be 0.
        sliding_window: HF's window size W (key j visible to query i iff i - W < j <= i), or None.
        kwargs: HF's per-call keywords; ``seqpar_info`` from shard_batch is used, ``seqpar_cache``
            (a :class:`seqpar.inference.CacheStep` from seqpar.inference's prefill or decode) takes
            the layer's q/k/v instead of :func:`seqpar.attention`, the ones in
            ``_UNSUPPORTED_KWARGS`` are refused when set.

    Returns:
        ``(out [B, S/sp, H, D], None)``: HF's convention (attention weights are never materialised).

    Communication: that of the strategy chosen in apply() over ``mesh.sp_group`` (or the cache step's).
    """
    s = getattr(module, _SETTINGS_ATTR, None)
    if not isinstance(s, HFSettings):
        raise ConfigError(f"{type(module).__name__} runs attn_implementation='seqpar' but its model was not "
                          f"prepared: call seqpar.integrations.hf.apply(model, mesh) (it also sets up the mesh, "
                          f"strategy and input checks)")
    _check_call(s, query, key, attention_mask, dropout, kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    window = _checked_window(s, sliding_window, causal)
    s.calls += 1
    # [B, H, S, D] -> BSHD views; seqpar's kernels make what they need contiguous
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if torch.is_autocast_enabled(query.device.type):  # as SDPA under autocast: q (RoPE'd in fp32), k, v alike
        dtype = torch.get_autocast_dtype(query.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    step = kwargs.get(CACHE_KEY)  # seqpar.inference's prefill or decode step, None in training
    if step is not None:
        check(causal, ConfigError, f"{s.name}: seqpar inference needs a causal LM (this attention has is_causal=False)")
        return step.attend(_layer_index(module), q, k, v, scale=scaling, window=window), None
    n, local = s.mesh.sp, query.shape[2]
    info = batch_info(kwargs.get(INFO_KEY), s.mesh, s.layout, local)
    bounds = None
    if window is not None:
        cu = info.padded_cu_seqlens if info is not None else (0, local * n)
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if window < longest:  # a window as long as every document is no window (cheaper plan)
            bounds = (window - 1, 0)
    out = attention(q, k, v, causal=causal, strategy=s.strategy, mesh=s.mesh, layout=s.layout, seq_info=info,
                    scale=scaling, window=bounds)
    return out, None


def _check_call(s: HFSettings, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                dropout: float, kwargs: dict[str, Any]) -> None:
    """ConfigErrors for what an attention call asks and seqpar cannot do exactly (on every rank alike)."""
    check(attention_mask is None, ConfigError,
          f"{s.name}: an attention_mask of shape {tuple(getattr(attention_mask, 'shape', ()))} reached the seqpar "
          f"attention: padding masks cannot be applied to a sharded sequence; drop padding and pack documents "
          f"(shard_batch with position_ids restarting at 0), and call the model prepared by apply()")
    check(not dropout, ConfigError,
          f"{s.name}: attention dropout {dropout} is not supported by seqpar.attention: set the config's "
          f"attention dropout (attention_dropout, attn_pdrop, ...) to 0.0")
    for name, what in _UNSUPPORTED_KWARGS.items():
        check(kwargs.get(name) is None, ConfigError, f"{s.name}: seqpar attention does not support {what}")
    check(not kwargs.get("output_attentions"), ConfigError,
          f"{s.name}: output_attentions=True needs the full attention matrix, which seqpar never materialises: "
          f"drop output_attentions")
    check(key.shape[2] == query.shape[2], ConfigError,
          f"{s.name}: {key.shape[2]} keys for {query.shape[2]} queries (HF's KV cache?): generate with "
          f"seqpar.inference.generate(model, input_ids), whose cache is sharded over the sequence")


def _checked_window(s: HFSettings, sliding_window: int | None, causal: bool) -> int | None:
    """HF's sliding window size W as an int (None: full attention), or a ConfigError for one seqpar cannot run."""
    if sliding_window is None:
        return None
    check(causal, ConfigError,
          f"{s.name}: a bidirectional sliding window (is_causal=False with sliding_window) is not "
          f"supported: seqpar's window follows HF's causal semantics only")
    check(int(sliding_window) >= 1, ConfigError, f"{s.name}: sliding_window={sliding_window} must be >= 1")
    return int(sliding_window)


def _layer_index(module: nn.Module) -> int:
    """The decoder layer of an HF attention module (its cache slot in seqpar inference)."""
    i = getattr(module, "layer_idx", None)
    if not isinstance(i, int):
        raise ConfigError(f"{type(module).__name__} has layer_idx={i!r}: seqpar inference needs HF attention "
                          f"modules that know their layer index")
    return i


def _binder(module: nn.Module):
    """``bind(args, kwargs) -> {name: value}`` for module.forward (HF forwards take no positional-only args)."""
    sig = inspect.signature(module.forward)  # once: follows functools.wraps through HF's decorators
    var_kw = {n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD}

    def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError:  # let the model's own call report bad arguments
            return dict(kwargs)
        out: dict[str, Any] = {}
        for name, val in bound.arguments.items():
            if name in var_kw:
                out.update(val)
            else:
                out[name] = val
        return out
    return bind


def _top_pre_hook(s: HFSettings, module: nn.Module):
    bind = _binder(module)

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        call = bind(args, kwargs)
        check(call.get("labels") is None or call.get("shift_labels") is not None, ConfigError,
              f"{s.name} got labels without shift_labels: HF would shift them on each shard, so every shard's "
              f"last token would lose its target; pass the batch from seqpar.integrations.hf.shard_batch (labels "
              f"shifted before sharding, with shift_labels) and use causal_lm_loss for the exact global loss")
        return None
    return hook


def _base_pre_hook(s: HFSettings, module: nn.Module):
    bind = _binder(module)

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        call = bind(args, kwargs)
        mask = call.get("attention_mask")
        if mask is not None:
            check(isinstance(mask, torch.Tensor) and mask.dim() == 2, ConfigError,
                  f"{s.name}: a custom {getattr(mask, 'dim', lambda: '?')()}-D attention_mask cannot be applied to "
                  f"a sharded sequence: seqpar applies the causal (and document/window) mask itself; drop it")
            check(bool(mask.bool().all()), ConfigError,
                  f"{s.name}: a padding attention_mask is not supported with sequence parallelism: pack the "
                  f"sequences into one row with position_ids restarting at 0 at each document instead (shard_batch "
                  f"turns them into cu_seqlens); right padding alone needs no mask in a causal LM: drop the mask "
                  f"and set its labels to -100")
            call["attention_mask"] = None  # all ones: nothing to mask (HF would otherwise just pass it through)
        output_attentions = call.get("output_attentions")
        if output_attentions is None:
            output_attentions = getattr(module.config, "output_attentions", False)
        check(not output_attentions, ConfigError,
              f"{s.name}: output_attentions=True needs the full attention matrix, which seqpar never "
              f"materialises: drop output_attentions (and config.output_attentions)")
        for name in ("cache", "past_key_values"):
            check(call.get(name) is None, ConfigError,
                  f"{s.name}: HF's KV cache ({name}=) cannot hold a sequence-sharded cache: generate with "
                  f"seqpar.inference.generate(model, input_ids) (or prefill / decode_step), not model.generate")
        check(not call.get("use_cache"), ConfigError,
              f"{s.name}: use_cache=True is not supported with sequence parallelism: for generation use "
              f"seqpar.inference.generate(model, input_ids), which keeps a KV cache sharded over the sequence")
        call["use_cache"] = False  # HF defaults it from config.use_cache; a cache of local K/V is useless here
        s.calls = 0
        return (), call
    return hook


def _base_post_hook(s: HFSettings):
    def hook(module: nn.Module, args: tuple, output: Any):
        check(s.calls > 0, ConfigError,
              f"{s.name}: no attention layer called the seqpar attention function: this architecture does not "
              f"route attention through transformers' AttentionInterface, so it cannot run sequence-parallel")
        check(s.expected_calls is None or s.calls >= s.expected_calls, ConfigError,
              f"{s.name}: only {s.calls} of {s.expected_calls} decoder layers called the seqpar attention "
              f"function: the other layers mix tokens another way and would only see their local shard")
        return None
    return hook


def _rope_types(config) -> set[str]:
    """Every rope_type a config names (``rope_scaling`` / ``rope_parameters``, per layer type where nested)."""
    found: set[str] = set()
    for attr in ("rope_scaling", "rope_parameters"):
        spec = getattr(config, attr, None)
        if isinstance(spec, dict):
            for d in (spec, *(x for x in spec.values() if isinstance(x, dict))):
                kind = d.get("rope_type", d.get("type"))
                if isinstance(kind, str):
                    found.add(kind)
    return found


def apply(model: nn.Module, mesh: Mesh | None = None, strategy: str = "ring", layout: str = "zigzag", *,
          recompute: str = "none", offload: bool = False, mlp_tiles: int = 1) -> nn.Module:
    """Make a Hugging Face causal LM run sequence-parallel attention over ``mesh.sp_group``.

    Registers :func:`hf_attention` as attention implementation ``"seqpar"``
    (``transformers.AttentionInterface.register``), switches ``model`` to it
    (``model.set_attn_implementation``), stores ``mesh``/``strategy``/``layout`` on
    the model's modules and installs forward hooks that check the inputs
    (padding masks, caches, ``output_attentions``, unshifted labels) and, after
    each forward, that every decoder layer's attention went through seqpar.

    Args:
        model: a ``transformers.PreTrainedModel`` (e.g. ``LlamaForCausalLM``); changed in place.
        mesh: the dp x sp mesh (default: the default mesh; tp must be 1).
        strategy: ``ring``, ``ulysses``, ``allgather``, ``usp`` or ``ring_qk_av`` (see seqpar.attention).
        layout: the sequence layout the batches are sharded in (``shard_batch(..., layout=)``).
        recompute, offload, mlp_tiles: memory settings, see :func:`seqpar.integrations.hf_memory.apply_memory`.

    Returns:
        ``model`` (calling apply again replaces the previous settings).

    No communication.  Raises ConfigError for models or settings it cannot run exactly.
    """
    # the checks, then the changes, one named step each
    transformers = _import_transformers()
    mesh = _check_settings(mesh, strategy, layout)
    _check_model(model, transformers)
    _route_attention(model, transformers)
    _install(model, mesh, strategy, layout)
    from .hf_memory import apply_memory

    apply_memory(model, recompute=recompute, offload=offload, mlp_tiles=mlp_tiles)
    from . import hf_inference  # noqa: F401  (registers the inference adapter; imported here: it imports this module)

    return model


def _import_transformers() -> ModuleType:
    """The ``transformers`` module, or a ConfigError naming the version needed."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ConfigError("the Hugging Face integration needs transformers: pip install 'transformers>=4.53'") from e
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    check(version >= MIN_TRANSFORMERS, ConfigError,
          f"transformers {transformers.__version__} builds local causal masks for custom attention functions; "
          f"the seqpar integration needs transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (masking_utils)")
    return transformers


def _check_settings(mesh: Mesh | None, strategy: str, layout: str) -> Mesh:
    """The mesh apply() means, after ConfigErrors for a mesh, strategy or layout the integration cannot run."""
    mesh = resolve_mesh(mesh)
    check_mesh(mesh)
    check(strategy in SP_STRATEGIES, ConfigError, f"unknown strategy {strategy!r}: choose one of {SP_STRATEGIES}")
    check(strategy != "usp" or (mesh.ulysses > 1 and mesh.ring > 1), ConfigError,
          f"strategy='usp' needs a 2-D mesh (seqpar.init(sp=N, ulysses=u) with 1 < u < N), got {mesh}")
    get_layout(layout)
    return mesh


def _check_model(model: nn.Module, transformers: ModuleType) -> None:
    """ConfigErrors for a model whose attention seqpar cannot reproduce exactly on a sequence shard."""
    check(isinstance(model, transformers.PreTrainedModel), ConfigError,
          f"apply() takes a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    config: Any = model.config
    check(not getattr(config, "is_encoder_decoder", False), ConfigError,
          f"{name} is an encoder-decoder: only decoder-only causal LMs are supported")
    layer_types = getattr(config, "layer_types", None) or []
    bad = sorted(set(layer_types) - set(_LAYER_TYPES))
    check(not bad, ConfigError,
          f"{name} has layer types {bad}: seqpar attention reproduces only {list(_LAYER_TYPES)}; "
          f"these layers would see only their local shard of the sequence")
    bad = sorted(_rope_types(config) & set(_POSITION_DEPENDENT_ROPE))
    check(not bad, ConfigError,
          f"{name} uses rope_type {bad}: HF recomputes its frequencies from the largest position in each "
          f"forward, which differs between sequence shards, so ranks would rotate their tokens unlike one device; "
          f"use static RoPE scaling (default, linear, llama3, yarn) for sequence-parallel runs")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    check(can_set is None or can_set(), ConfigError,
          f"{name} does not route attention through transformers' AttentionInterface "
          f"(transformers {transformers.__version__}), so seqpar cannot replace its attention")


def _route_attention(model: nn.Module, transformers: ModuleType) -> None:
    """Register :func:`hf_attention` with transformers and switch ``model`` to it (no mask function: see below)."""
    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention)
    # masks: an implementation without a mask function makes create_causal_mask return the user's mask as is
    # (None after our pre-hook); a mask function under our name would make HF build local [S/sp, S/sp] masks
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    check(ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS, ConfigError,
          f"a mask function is registered under {ATTN_IMPLEMENTATION!r} in transformers' AttentionMaskInterface: "
          f"HF would build local masks; unregister it")
    config: Any = model.config
    set_impl: Any = getattr(model, "set_attn_implementation", None)
    if callable(set_impl):
        set_impl(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - transformers without set_attn_implementation
        config._attn_implementation = ATTN_IMPLEMENTATION
    check(config._attn_implementation == ATTN_IMPLEMENTATION, ConfigError,
          f"{type(model).__name__} refused attn_implementation={ATTN_IMPLEMENTATION!r} (it is "
          f"{config._attn_implementation!r}): this architecture does not use transformers' AttentionInterface")


def _install(model: nn.Module, mesh: Mesh, strategy: str, layout: str) -> HFSettings:
    """Store fresh :class:`HFSettings` on every submodule and install the input and coverage hooks
    (replacing those of an earlier apply())."""
    old = getattr(model, _SETTINGS_ATTR, None)
    if isinstance(old, HFSettings):
        for h in old.hooks:
            h.remove()
    layers = getattr(model.config, "num_hidden_layers", None)
    s = HFSettings(mesh=mesh, strategy=strategy, layout=layout, name=type(model).__name__,
                   expected_calls=layers if isinstance(layers, int) and layers > 0 else None)
    for m in model.modules():  # plain attribute: survives deepcopy, ignored by state_dict
        setattr(m, _SETTINGS_ATTR, s)
    base = getattr(model, "base_model", model)
    if base is not model:  # a bare base model takes no labels
        s.hooks.append(model.register_forward_pre_hook(_top_pre_hook(s, model), with_kwargs=True))
    s.hooks.append(base.register_forward_pre_hook(_base_pre_hook(s, base), with_kwargs=True))
    s.hooks.append(base.register_forward_hook(_base_post_hook(s)))
    return s


def __getattr__(name: str):
    if name in ("Trainer", "SFTTrainer", "SeqParTrainerMixin"):  # loaded on first use: transformers.Trainer, trl
        from . import hf_trainer

        return getattr(hf_trainer, name)
    if name == "attention_forward":
        _RENAMED[name] = ("hf_attention", hf_attention)
    if name in _RENAMED:
        import warnings

        new, obj = _RENAMED[name]
        warnings.warn(f"seqpar.integrations.hf.{name} was renamed {new}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
