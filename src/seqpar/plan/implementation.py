"""Activation accounting of seqpar's own model (``implementation="seqpar"``).

The default accounting (``implementation="paper"``, :mod:`seqpar.plan.memory`)
is Korthikanti et al.'s GPT layer. :class:`seqpar.models.LlamaForCausalLM`
stores a different set of tensors; this module lists them one by one, as
read off autograd's saved-tensor hooks on CPU (``benchmarks/plan_validation.py``
prints the measured bytes next to these predictions; ``tests/test_plan_validation.py``
holds them within 10%; they agree to the byte on CPU). Per layer, with ``p`` the
activation dtype size, ``acc = max(p, 4)`` (float32 statistics, float64 for
float64), ``rep``/``loc`` the token rows of tensor-parallel replicated / sharded
tensors (:class:`~seqpar.plan.parallel_layout.ParallelLayout`):

=================  ==============================================  =========================================
term               bytes                                           where it comes from
=================  ==============================================  =========================================
norm_inputs        ``2 acc rep h``                                 both RMSNorms keep their input, upcast to
                                                                   float32 by PyTorch's composite rms_norm
norm_normalized    ``2 acc rep h``                                 ... and ``x * rstd`` (weight gradient)
norm_rstd          ``2 acc rep``                                   ... and ``rstd``
qkv_input          ``p rep h``                                     fused qkv linear input (a shard with SP)
mlp_input          ``p rep h``                                     fused gate_up linear input
rope_tables        ``16 (s/sp) d``                                 float32 cos and sin, for q and for k,
                                                                   ``[S/sp, D]``: shared by the batch, not
                                                                   split by tp
mlp_hidden         ``4 p loc f/t``                                 gate_up output (2f: SiLU keeps gate, the
                                                                   product keeps up, both views of it), SiLU
                                                                   output (f), down-projection input (f)
=================  ==============================================  =========================================

Attention, by strategy (``a_t``/``kv_t`` heads per tp rank):

* local core (``none``, ``megatron``, ``ring``, ``allgather``): ``q`` and ``k``
  after RoPE (``p loc a_t d``, ``p loc kv_t d``), the whole fused qkv output
  (``p loc (a_t + 2 kv_t) d``: ``v`` is a view of it and keeps it alive),
  ``attn_output`` (``p loc a_t d``, also the o-projection input) and the
  log-sum-exp (``acc b a_t s/sp``). The all-gather strategy re-gathers K/V in
  backward instead of keeping them.
* ``ulysses`` / ``usp``: after the all-to-all, the exchanged q, k, v
  (``p b q_rows (heads_attn + 2 kv_attn) d``), the output and lse at that
  size, and the o-projection input again after the return all-to-all
  (``p loc a_t d``). RoPE'd q/k and the qkv output are not kept (the
  all-to-all does not save its input). Causal ``ulysses`` on a permuted
  (zigzag) layout also keeps the int64 inverse permutation (``8 s``) and the
  permutation itself, which is cached by the layout and so shared by all layers:
  it is counted once, outside the layers (a layer measured alone shows ``8 s``
  bytes more than its term).
* ``ring_qk_av``: q, k, the qkv output as the local core, the float32
  probabilities ``acc b a_t (s/sp) s`` and the o-projection input.

Whole model (forward + :func:`seqpar.train.causal_lm_loss`): token ids
(int64, plus a bool mask with tp), the final RMSNorm as above, the LM-head
input, the cross entropy's float32 softmax ``acc b (s/sp) v/t``, 10 bytes
per token of targets and masks and the loss's 0-d scale factor.  With the
chunked loss (``loss_chunk``): instead of the softmax and masks, the int64
labels and two float32 statistics per token.

Memory settings (:mod:`seqpar.core.recompute`): ``"selective"`` keeps each
norm's ``p``-byte input instead of its float32 internals and, of SwiGLU, the
gate_up output and the down-projection input (``3 p loc f/t``), and drops
``ring_qk_av``'s probabilities; ``mlp_tiles > 1`` keeps of the MLP block (its
norm and the MLP) only the input ``p rep h``; ``"full"`` keeps the layer input
(every k-th with ``checkpoint_every``).

Modelling choices: no dropout (the model has none); ``attention_kernel`` is
irrelevant (every kernel path saves only out and lse); ``recompute="full"``
keeps the layer input only (no layer then saves Ulysses' cached permutation). PyTorch's CUDA build may
dispatch RMSNorm to a fused kernel that keeps only the input and ``rstd``:
run the validation script with ``--device cuda`` to see what a GPU stores.
"""
from __future__ import annotations

import math

from seqpar.core.configs import ModelConfig
from seqpar.plan.parallel_layout import ParallelLayout

__all__ = ["IMPLEMENTATIONS", "seqpar_layer_terms", "seqpar_non_layer_terms"]

IMPLEMENTATIONS = ("paper", "seqpar")

_LOCAL_CORE = ("none", "megatron", "ring", "allgather")


def _acc(p: int) -> int:
    """Bytes of the statistics dtype: float32, or float64 for float64 activations."""
    return max(p, 4)


def _norm(acc: int, rows: int, h: int, count: int) -> dict[str, int]:
    return {"norm_inputs": count * acc * rows * h, "norm_normalized": count * acc * rows * h,
            "norm_rstd": count * acc * rows}


def seqpar_layer_terms(cfg: ModelConfig, lay: ParallelLayout, recompute: str, dtype_bytes: int,
                       causal: bool = True, mlp_tiles: int = 1) -> dict[str, int]:
    """Bytes one decoder layer of :class:`seqpar.models.LlamaForCausalLM` saves for backward, per GPU.

    ``recompute="selective"`` checkpoints each RMSNorm (keeping its ``p``-byte input instead of the
    float32 internals) and the SwiGLU product (keeping the gate_up output, not SiLU's), and the
    attention core where it keeps scores (``ring_qk_av``); ``mlp_tiles > 1`` keeps of the whole MLP
    block (its norm and the MLP) only its input.
    """
    p, b, h, d = dtype_bytes, lay.micro_batch, cfg.hidden_size, cfg.d
    acc = _acc(p)
    rep = b * lay.s_replicated
    loc = b * lay.s_local
    if recompute == "full":
        return {"layer_input": p * rep * h}
    sel = recompute == "selective"
    tiles = mlp_tiles > 1
    norms = 1 if tiles else 2  # the tiled MLP block keeps its norm's input only (below)
    terms = {"norm_inputs": norms * p * rep * h} if sel else _norm(acc, rep, h, norms)
    terms.update(qkv_input=p * rep * h, rope_tables=16 * lay.s_local * d)
    a_t, kv_t = lay.heads_tp, lay.kv_tp
    local_qkv = {"q": p * loc * a_t * d, "k": p * loc * kv_t * d, "qkv_output": p * loc * (a_t + 2 * kv_t) * d}
    st = lay.strategy
    if st in _LOCAL_CORE:
        terms.update(local_qkv)
        terms["attn_output"] = p * loc * a_t * d
        terms["softmax_lse"] = acc * b * a_t * lay.s_local
    elif st in ("ulysses", "usp"):
        rows = b * lay.q_rows
        terms["qkv_exchanged"] = p * rows * (lay.heads_attn + 2 * lay.kv_attn) * d
        terms["attn_output"] = p * rows * lay.heads_attn * d
        terms["softmax_lse"] = acc * rows * lay.heads_attn
        terms["o_input"] = p * loc * a_t * d
        if st == "ulysses" and causal and lay.ulysses > 1:
            terms["inverse_permutation"] = 8 * lay.seq_len  # int64, zigzag -> global order
    else:  # ring_qk_av
        terms.update(local_qkv)
        terms["scores"] = 0 if sel else acc * b * a_t * lay.s_local * lay.seq_len
        terms["o_input"] = p * loc * a_t * d
    if tiles:
        terms["mlp_block_input"] = p * rep * h
    else:
        terms["mlp_input"] = p * rep * h
        terms["mlp_hidden"] = (3 if sel else 4) * p * loc * lay.ffn_tp
    return terms


def seqpar_non_layer_terms(cfg: ModelConfig, lay: ParallelLayout, dtype_bytes: int,
                           causal: bool = True, loss_chunk: int = 0, recompute: str = "none") -> dict[str, int]:
    """Bytes saved outside the layers by the model's forward and its loss, per GPU.

    ``loss_chunk = 0``: :func:`seqpar.train.causal_lm_loss` on the logits (its float32 softmax);
    ``> 0``: the chunked loss from the hidden states, which keeps the LM head's input, the targets
    and two float32 statistics per token.
    """
    p, b, h = dtype_bytes, lay.micro_batch, cfg.hidden_size
    acc = _acc(p)
    rep, loc = b * lay.s_replicated, b * lay.s_local
    terms = {"embedding_ids": 8 * loc + (loc if lay.tp > 1 else 0)}  # int64 ids (+ bool "not my rows")
    terms.update({f"final_{k}": v for k, v in _norm(acc, rep, h, 1).items()})
    terms["output_input"] = p * rep * h
    if loss_chunk:
        terms["loss_targets"] = 8 * loc  # the int64 labels
        terms["loss_statistics"] = 2 * acc * loc  # max and sum of exponentials per token
    else:
        terms["logits_softmax"] = acc * loc * math.ceil(cfg.vocab_size / lay.tp)
        terms["loss_bookkeeping"] = 10 * loc  # int64 target index + bool masks (own, valid)
    terms["loss_scale"] = acc  # the 0-d (dp * sp) / tokens factor of the loss
    if lay.strategy == "ulysses" and causal and lay.ulysses > 1 and recompute != "full":
        terms["layout_permutation"] = 8 * lay.seq_len  # cached by the layout, saved by every layer
    return terms
