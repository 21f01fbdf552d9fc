"""The inference adapter protocol: a third model, neither seqpar's nor HF's, generates exactly through it;
the reference model's and the HF integration's adapters agree on the same weights; the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqpar
from seqpar.core.mesh import Mesh
from seqpar.inference import (
    CacheStep,
    InferenceAdapter,
    LastToken,
    adapter_for,
    decode_step,
    generate,
    prefill,
    register_adapter,
)
from seqpar.models import LlamaForCausalLM, rope
from tests.helpers import mesh

VOCAB, HID, H, HKV, D, BATCH, NEW = 64, 32, 4, 2, 8, 2, 6


class TinyLM:
    """A minimal causal LM implementing :class:`InferenceAdapter` itself: embedding, attention-only
    layers (RoPE, GQA, the second with a sliding window of 5), a head; no nn.Module, no norms."""

    name, strategy, tp_cut, device = "TinyLM", "ring", 1, torch.device("cpu")

    def __init__(self, m: Mesh, layout: str = "zigzag", windows: tuple = (None, 5)):
        g = torch.Generator().manual_seed(0)

        def w(*shape):
            return torch.randn(*shape, generator=g) * 0.3

        self.mesh, self.layout, self.windows, self.num_layers = m, layout, windows, len(windows)
        self.emb, self.head = w(VOCAB, HID), w(HID, VOCAB)
        self.wq, self.wk, self.wv = ([w(HID, n * D) for _ in windows] for n in (H, HKV, HKV))
        self.wo = [w(H * D, HID) for _ in windows]

    def check_mesh(self, m: Mesh | None) -> Mesh:
        return m if m is not None else self.mesh

    def prompt_layout(self, layout, m: Mesh):
        return layout if layout is not None else self.layout

    def _qkv(self, i: int, x: torch.Tensor, pos: torch.Tensor):
        b, s = x.shape[:2]
        q, k, v = ((x @ p[i]).view(b, s, -1, D) for p in (self.wq, self.wk, self.wv))
        return rope(q, pos, 10000.0), rope(k, pos, 10000.0), v

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, step: CacheStep,
               last: LastToken | None = None) -> torch.Tensor:
        x = self.emb[input_ids]
        for i, window in enumerate(self.windows):
            q, k, v = self._qkv(i, x, positions)
            x = x + step.attend(i, q, k, v, window=window).flatten(2) @ self.wo[i]
        if last is not None:
            x = last.select(x)
        return x @ self.head

    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """One device, no cache: every token's logits (the reference)."""
        s = ids.shape[1]
        pos = torch.arange(s)
        x = self.emb[ids]
        i_, j_ = pos[:, None], pos[None, :]
        for i, window in enumerate(self.windows):
            q, k, v = self._qkv(i, x, pos)
            visible = (j_ <= i_) & (j_ > i_ - window if window is not None else True)
            k, v = (t.repeat_interleave(H // HKV, 2) for t in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=visible).transpose(1, 2)
            x = x + out.flatten(2) @ self.wo[i]
        return x @ self.head


def _prompt(s: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, s), generator=torch.Generator().manual_seed(s))


def _reference(s: int, new: int = NEW):
    """Greedy ids and the last logits of each step, recomputing the whole sequence per token."""
    model, ids, steps = TinyLM(Mesh()), _prompt(s), []
    for _ in range(new):
        logits = model.full_logits(ids)[:, -1]
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, steps


def _run(model: TinyLM, s: int, strategy: str):
    """generate, and the same loop by hand: (ids, logits per step, tokens each layer holds, cache.lengths)."""
    ids = generate(model, _prompt(s), NEW, strategy=strategy)
    cache, logits = prefill(model, _prompt(s), strategy=strategy)
    steps = [logits]
    for _ in range(NEW - 1):
        logits = decode_step(model, cache, logits.argmax(-1))
        steps.append(logits)
    return ids, steps, [layer.len for layer in cache.layers], list(cache.lengths)


def run_tiny(s: int, strategy: str, layout: str):
    return _run(TinyLM(mesh(sp=2), layout), s, strategy)


def _check(ids, steps, s):
    want_ids, want_steps = _reference(s)
    assert torch.equal(ids, want_ids), (ids[:, s:], want_ids[:, s:])
    for got, want in zip(steps, want_steps):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_third_model_generates_like_one_device_through_the_adapter():
    model = TinyLM(Mesh())
    assert isinstance(model, InferenceAdapter) and adapter_for(model) is model
    ids, steps, layer_lens, lengths = _run(model, 13, "ring")
    _check(ids, steps, 13)
    assert lengths == [13 + NEW - 1] and layer_lens == [13 + NEW - 1, 5]


@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "contiguous")])
def test_a_third_model_generates_like_one_device_at_world_2(pool, strategy, layout):
    s = 13  # padded to the layout; layer 1's window (5) shorter than the prompt
    res = pool(2).run(run_tiny, s, strategy, layout)
    for ids, steps, _, lengths in res:
        _check(ids, steps, s)
        assert lengths == res[0][3] and sum(lengths) == s + NEW - 1
    # the windowed layer holds exactly its last 5 tokens over both ranks, the full one every token
    assert [sum(r[2][i] for r in res) for i in range(2)] == [s + NEW - 1, 5]


class Wrapped:
    """A model the registry knows through a factory (as the HF integration registers its models)."""

    def __init__(self, lm: TinyLM):
        self.lm = lm


def test_registered_factories_and_unknown_models():
    register_adapter(lambda m: m.lm if isinstance(m, Wrapped) else None)
    assert torch.equal(generate(Wrapped(TinyLM(Mesh())), _prompt(9), NEW), _reference(9)[0])
    with pytest.raises(seqpar.ConfigError, match="any object implementing seqpar.inference.InferenceAdapter"):
        prefill(object(), _prompt(8))


def _both(m: Mesh):
    """The reference model and a stock HF Llama with the same weights, the HF one prepared by apply()."""
    from seqpar.integrations import hf
    from tests.integrations.test_hf import build

    theirs = build("llama", rms_norm_eps=1e-5).eval()
    sd = theirs.state_dict()
    full = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for i in range(2):
        full.update({f"layers.{i}.{ours}.weight": sd[f"model.layers.{i}.{hfs}.weight"] for ours, hfs in names.items()})
    ours = LlamaForCausalLM("tiny", mesh=m, strategy="ring", layout="zigzag")
    ours.load_full_state_dict(full)
    return ours.eval(), hf.apply(theirs, m, strategy="ring", layout="zigzag")


def run_both(s: int):
    m = mesh(sp=2)
    out = []
    for model in _both(m):
        ids = torch.randint(0, 128, (BATCH, s), generator=torch.Generator().manual_seed(s))
        _, logits = prefill(model, ids)
        out.append((generate(model, ids, NEW), logits))
    return out


def test_the_reference_and_hf_adapters_agree_on_the_same_weights(pool):
    """The reference adapter sums the last token's hidden state over sp and then runs the head; the HF one
    runs HF's head on the owner and sums the logits: the same tokens and logits either way."""
    pytest.importorskip("transformers", minversion="4.53")
    for (ours_ids, ours_logits), (hf_ids, hf_logits) in pool(2).run(run_both, 21):
        assert torch.equal(ours_ids, hf_ids)
        torch.testing.assert_close(ours_logits, hf_logits, atol=2e-5, rtol=1e-4)
