"""Sequence-parallel inference of stock Hugging Face models equals one device: tokens, logits, cache, traffic.

The reference is the single-process HF model (sdpa) generating greedily; it is checked once
against HF's own ``model.generate`` (with its KV cache, sliding-window caches included), so the
comparison is with what an HF user gets on one device.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.53",
                                   reason="needs transformers>=4.53 (pip install transformers)")

import seqpar  # noqa: E402
from seqpar.inference import CacheError, KVCache, decode_step, generate, prefill  # noqa: E402
from seqpar.integrations import hf  # noqa: E402
from tests.helpers import example, mesh  # noqa: E402
from tests.integrations.test_hf import build, data  # noqa: E402

BATCH, NEW = 2, 6

_REF: dict = {}


def _reference(arch: str, s: int, new: int = NEW, **extra):
    """One process, HF sdpa, no cache: a full forward on the growing sequence per token -> (ids, logits)."""
    key = (arch, s, new, tuple(sorted(extra.items())))
    if key not in _REF:
        model = build(arch, **extra).eval()
        ids, steps = data(BATCH, s, seed=s), []
        with torch.no_grad():
            for _ in range(new):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                steps.append(logits)
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        _REF[key] = ids, steps
    return _REF[key]


def run_generate(arch: str, s: int, new: int, strategy: str, layout: str, degrees: dict):
    """Worker: apply -> generate, and the same loop by hand to look at the cache and the logits."""
    m = mesh(**degrees)
    model = hf.apply(build(arch).eval(), m, strategy=strategy, layout=layout)
    ids = data(BATCH, s, seed=s)
    tokens = generate(model, ids, new)
    cache, logits = prefill(model, ids)
    after_prefill = {"lengths": list(cache.lengths), "positions": cache.positions.tolist(),
                     "k_shapes": [tuple(layer.k.shape) for layer in cache.layers]}
    steps = [logits]
    for _ in range(new - 1):
        logits = decode_step(model, cache, logits.argmax(-1))
        steps.append(logits)
    return {"tokens": tokens, "logits": steps, "prefill": after_prefill, "lengths": list(cache.lengths),
            "positions": cache.positions.tolist(), "rank": m.rank("sp"), "nbytes": cache.nbytes(),
            "layer_lens": [layer.len for layer in cache.layers]}


CASES = [  # arch, world, strategy, degrees, layout, prompt length
    ("llama", 2, "ring", {}, "zigzag", 21),  # 21 tokens: padded to 24, padding masked and never cached
    ("llama", 4, "usp", {"sp": 4, "ulysses": 2}, "zigzag", 37),
    ("llama", 4, "ulysses", {}, "contiguous", 40),
    ("mistral", 2, "ring", {}, "zigzag", 23),  # window 6 on every layer: decode sees only recent keys
    ("mistral", 4, "allgather", {}, "stripe", 30),
    ("qwen2", 4, "ring", {}, "zigzag", 26),  # a full and a sliding layer (window 5)
    ("qwen3", 2, "ulysses", {}, "zigzag", 20),
    ("gemma3", 2, "ring", {}, "zigzag", 19),  # query_pre_attn_scalar, sliding + full layers, final softcap
]
#: each layer's sliding window in the tiny models of tests/integrations/test_hf.py (None: full attention)
WINDOWS = {"llama": [None, None], "mistral": [6, 6], "qwen2": [None, 5], "qwen3": [None, None],
           "gemma3": [6, None]}


def _expected_len(positions: list[int], window: int | None, query: int) -> int:
    """Tokens a layer keeps: all of the rank's, or on a window layer those the query at ``query`` (and any
    later one) can still see."""
    return len(positions) if window is None else sum(p > query - window for p in positions)


@pytest.mark.parametrize("arch,world,strategy,degrees,layout,s", CASES,
                         ids=[f"{a}-w{w}-{st}-{lay}-S{s}" for a, w, st, _, lay, s in CASES])
def test_greedy_generation_equals_one_device(pool, arch, world, strategy, degrees, layout, s):
    ref_ids, ref_steps = _reference(arch, s)
    res = pool(world).run(run_generate, arch, s, NEW, strategy, layout, degrees)
    for r in res:
        assert torch.equal(r["tokens"], ref_ids), (r["tokens"][:, s:], ref_ids[:, s:])
        for got, want in zip(r["logits"], ref_steps):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # after prefill each rank holds its own real prompt tokens only (no padding), in [B, n, Hkv, D];
    # a sliding-window layer only those the first decoded token (at position s) can see
    by_rank = {r["rank"]: r for r in res}
    assert sorted(p for r in by_rank.values() for p in r["prefill"]["positions"]) == list(range(s))
    hkv, d, windows = 2, 16, WINDOWS[arch]
    for rank, r in by_rank.items():
        lengths, mine = r["prefill"]["lengths"], r["prefill"]["positions"]
        assert sum(lengths) == s and lengths[rank] == len(mine) < s
        assert r["prefill"]["k_shapes"] == [(BATCH, _expected_len(mine, w, s), hkv, d) for w in windows]
    # after decoding NEW - 1 tokens: every position held by one rank, shards within one token; window
    # layers hold exactly the last `window` tokens over all ranks (the last query sat at s + NEW - 2)
    lengths = res[0]["lengths"]
    assert all(r["lengths"] == lengths for r in res) and max(lengths) - min(lengths) <= 1
    assert sorted(p for r in by_rank.values() for p in r["positions"]) == list(range(s + NEW - 1))
    last = s + NEW - 2
    for i, w in enumerate(windows):
        held = sum(r["layer_lens"][i] for r in by_rank.values())
        assert held == (s + NEW - 1 if w is None else w), (i, w, held)
    for rank, r in by_rank.items():
        want = [_expected_len(r["positions"], w, last) for w in windows]
        assert r["layer_lens"] == want
        assert r["nbytes"] == sum(2 * BATCH * n * hkv * d * 4 for n in want)  # k and v, float32


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_the_window_matters_in_decode(arch):
    """The windowed archs' generations differ without the window, so the decode window is really tested."""
    s = 23 if arch == "mistral" else 19
    _, windowed = _reference(arch, s)
    _, full = _reference(arch, s, sliding_window=1000)
    assert max((a - b).abs().max().item() for a, b in zip(windowed[1:], full[1:])) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_reference_is_hf_generate(arch):
    """The cache-less reference equals HF's own greedy generate with its KV cache (sliding caches too)."""
    s = {"llama": 21, "mistral": 23, "qwen2": 26, "gemma3": 19}[arch]
    ref_ids, _ = _reference(arch, s)
    model = build(arch).eval()
    ids = data(BATCH, s, seed=s)
    # an explicit all-ones mask: without one HF takes every pad_token_id in the prompt for padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref_ids)


def run_traffic(prompt_lens: list[int]):
    m = mesh(sp=4)
    model = hf.apply(build("llama").eval(), m, strategy="ring")
    out = []
    for s in prompt_lens:
        with seqpar.stats.track() as pre:
            cache, logits = prefill(model, data(BATCH, s, seed=s))
        with seqpar.stats.track() as dec:
            decode_step(model, cache, logits.argmax(-1))
        out.append({"prefill": (dict(pre.calls), dict(pre.bytes)), "decode": (dict(dec.calls), dict(dec.bytes))})
    return out


def test_decode_sends_one_small_all_gather_per_layer(pool):
    layers, h, d, vocab = 2, 4, 16, 128
    for small, large in pool(4).run(run_traffic, [16, 128]):
        for step in (small, large):
            calls, nbytes = step["decode"]
            assert calls == {"all_gather": layers}  # nothing else: the cache never moves
            assert nbytes == {"all_gather": layers * BATCH * h * (d + 1) * 4 * 3}  # [B,1,H,D+1] fp32 to 3 ranks
            calls, nbytes = step["prefill"]
            assert set(calls) == {"ring_exchange", "all_reduce"} and calls["all_reduce"] == 1
            assert nbytes["all_reduce"] == BATCH * vocab * 4  # the last token's logits, from its rank
        assert small["decode"] == large["decode"]  # independent of the prompt length


# ---- one process: world 1, and the errors (raised on every rank alike, before any collective) ----

def test_world_one_equals_one_device():
    model = hf.apply(build("mistral").eval(), seqpar.Mesh())
    assert torch.equal(generate(model, data(BATCH, 23, seed=23), NEW), _reference("mistral", 23)[0])


def test_bad_input_names_the_fix():
    model = hf.apply(build("llama").eval(), seqpar.Mesh(), layout="zigzag")
    ids = data(BATCH, 8)
    with pytest.raises(seqpar.ConfigError, match=r"not prepared for sequence parallelism: call .*hf.apply"):
        prefill(build("llama"), ids)
    with pytest.raises(seqpar.ConfigError, match=r"prepared with layout='zigzag'.*layout='contiguous'"):
        prefill(model, ids, layout="contiguous")
    with pytest.raises(seqpar.ShapeError, match=r"prompt length 7 .* multiple of 2.*pad=True"):
        prefill(model, data(BATCH, 7), pad=False)
    with pytest.raises(seqpar.ConfigError, match="unknown strategy 'rng'"):
        prefill(model, ids, strategy="rng")
    with pytest.raises(seqpar.ConfigError, match="not the one"):
        prefill(model, ids, mesh=seqpar.Mesh(ring=2))  # a mesh of another shape than the model's
    cache, logits = prefill(model, ids)
    with pytest.raises(seqpar.ShapeError, match=r"token_ids must be integer ids \[batch=2\]"):
        decode_step(model, cache, torch.zeros(3, dtype=torch.long))
    other = hf.apply(build("llama", num_hidden_layers=3).eval(), seqpar.Mesh())
    with pytest.raises(CacheError, match="2 layers for a model of 3"):
        decode_step(other, cache, logits.argmax(-1))
    # HF's own generation is refused with the way out
    with pytest.raises(seqpar.ConfigError, match=r"seqpar.inference.generate"):
        model.generate(ids, max_new_tokens=2)


def test_failed_decode_step_leaves_the_cache_unchanged():
    model = hf.apply(build("llama").eval(), seqpar.Mesh())
    cache, logits = prefill(model, data(BATCH, 8))
    before = (list(cache.lengths), [layer.len for layer in cache.layers])
    with pytest.raises(IndexError):  # HF's embedding rejects the id after the cache hook... or before it
        decode_step(model, cache, torch.full((BATCH,), 1000))
    assert (list(cache.lengths), [layer.len for layer in cache.layers]) == before


# ---- the example: examples/hf_generate.py generates what HF's own generate does on one process ----

def _example():
    return example("hf_generate")


def run_example(prompt_len: int, new: int):
    return _example().run(prompt_len=prompt_len, new=new, strategy="usp", mesh=mesh(sp=4, ulysses=2), log=False)


def test_example_generates_like_hf_on_one_process(pool):
    ids = pool(4).run(run_example, 301, 8)
    want = _example().reference(None, None, 301, 8)
    assert all(torch.equal(x, want) for x in ids)


# ---- debug mode: ranks fed different prompts or tokens fail together, naming the rank ----

def run_disagreeing_ranks(bad_rank: int, stage: str):
    m = mesh(sp=2)
    model = hf.apply(build("llama").eval(), m)
    seqpar.set_debug(True)
    try:
        odd = m.rank("sp") == bad_rank
        ids = data(BATCH, 12, seed=7 if odd and stage == "prefill" else 12)
        cache, logits = prefill(model, ids)
        tokens = logits.argmax(-1) + (1 if odd else 0)
        decode_step(model, cache, tokens % 128)
    except seqpar.ShapeError as e:
        return str(e)
    finally:
        seqpar.set_debug(False)
    return None


@pytest.mark.parametrize("stage", ["prefill", "decode_step"])
def test_debug_mode_names_the_rank_fed_other_tokens(pool, stage):
    msgs = pool(2).run(run_disagreeing_ranks, 1, stage, timeout=60)
    assert all(m is not None and f"ranks disagree before {stage}" in m for m in msgs), msgs
    # with two ranks neither is a majority: the message names the other one
    assert all("rank 1 runs" in m or "rank 0 runs" in m for m in msgs)


def test_window_layers_of_an_unordered_rank_mask_instead_of_forgetting(monkeypatch):
    """A rank whose positions do not ascend (no built-in layout does this) keeps every key and selects
    the window's keys at each step: the same tokens."""
    from seqpar.inference import common

    class Unordered(KVCache):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.ordered = False

    monkeypatch.setattr(common, "KVCache", Unordered)
    model = hf.apply(build("mistral").eval(), seqpar.Mesh())
    ids = data(BATCH, 23, seed=23)
    cache, logits = prefill(model, ids)
    assert isinstance(cache, Unordered) and all(layer.len == 23 for layer in cache.layers)
    assert torch.equal(generate(model, ids, NEW), _reference("mistral", 23)[0])


def run_data_parallel_generate(s: int):
    """dp=2 x sp=2: each data-parallel replica generates from its own prompt over its own sp pair."""
    m = mesh(dp=2, sp=2)
    model = hf.apply(build("qwen2").eval(), m)
    return m.rank("dp"), generate(model, data(BATCH, s + m.rank("dp"), seed=s + m.rank("dp")), NEW)


def test_data_parallel_replicas_generate_independently(pool):
    for dp_rank, ids in pool(4).run(run_data_parallel_generate, 26):
        assert torch.equal(ids, _reference("qwen2", 26 + dp_rank)[0])


def run_cache_of_another_model():
    """Decode with a cache filled by a model of another kv-head count: every rank fails alike, none hangs."""
    m = mesh(sp=2)
    cache, logits = prefill(hf.apply(build("llama").eval(), m), data(BATCH, 12, seed=12))
    other = hf.apply(build("llama", num_key_value_heads=1).eval(), m)
    try:
        decode_step(other, cache, logits.argmax(-1))
    except CacheError as e:
        return str(e)
    return None


def test_a_misfit_cache_fails_on_every_rank(pool):
    msgs = pool(2).run(run_cache_of_another_model, timeout=60)
    assert all(m is not None and "do not fit a cache of [B=2, *, Hkv=2, D=16]" in m for m in msgs), msgs


SAMPLED = dict(do_sample=True, temperature=1.3, top_p=0.9, seed=3)


def run_hf_sampled(arch: str, s: int):
    return generate(hf.apply(build(arch).eval(), mesh(sp=2)), data(BATCH, s, seed=s), NEW, **SAMPLED)


def test_sampled_generation_equals_one_process(pool):
    want = generate(hf.apply(build("gemma3").eval(), seqpar.Mesh()), data(BATCH, 19, seed=19), NEW, **SAMPLED)
    assert not torch.equal(want, _reference("gemma3", 19)[0])
    for ids in pool(2).run(run_hf_sampled, "gemma3", 19):
        assert torch.equal(ids, want)
