"""Sequence-parallel inference equals one device: greedy tokens, logits, cache placement, traffic."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.inference import CacheError, KVCache, decode_step, generate, prefill
from seqpar.core.layout import get_layout
from seqpar.core.mesh import Mesh
from seqpar.models import LlamaForCausalLM
from seqpar.tp.cross_entropy import vocab_parallel_argmax
from tests.helpers import mesh

SEED, STD, BATCH, NEW = 0, 0.1, 2, 6


def _prompt(s: int) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, s), generator=torch.Generator().manual_seed(s))


def _model(m, strategy="ring", layout="zigzag", sequence_parallel=True) -> LlamaForCausalLM:
    model = LlamaForCausalLM("tiny", mesh=m, strategy=strategy, layout=layout, sequence_parallel=sequence_parallel)
    model.init_weights(SEED, std=STD)
    return model.eval()


_REF: dict = {}


def _reference(s: int, new: int = NEW):
    """One device, no cache: a full forward on the growing sequence per token -> (ids, last logits per step)."""
    if (s, new) not in _REF:
        model = _model(Mesh(), layout="contiguous")  # contiguous: any length on one rank
        ids, steps = _prompt(s), []
        with torch.no_grad():
            for _ in range(new):
                logits = model(ids)[:, -1]
                steps.append(logits)
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        _REF[(s, new)] = ids, steps
    return _REF[(s, new)]


def run_inference(degrees: dict, strategy: str, layout: str, s: int, new: int, sequence_parallel: bool = True):
    m = mesh(**degrees)
    model = _model(m, strategy, layout, sequence_parallel)
    ids = _prompt(s)
    tokens = generate(model, ids, new, strategy=strategy)
    # the same loop by hand, to look at the cache and the logits on the way
    cache, logits = prefill(model, ids, strategy=strategy)
    after_prefill = {"lengths": list(cache.lengths), "positions": cache.positions.tolist(),
                     "k_shapes": [tuple(layer.k.shape) for layer in cache.layers], "nbytes": cache.nbytes()}
    steps = [logits]
    for _ in range(new - 1):
        nxt = vocab_parallel_argmax(logits, group=m.tp_group)
        logits = decode_step(model, cache, nxt)
        steps.append(logits)
    # gather the vocab shards only to compare with the reference (tests; generate never does)
    full = [seqpar.comm.all_gather(x, -1, m.tp_group) if m.tp > 1 else x for x in steps]
    return {"tokens": tokens, "logits": full, "prefill": after_prefill, "lengths": list(cache.lengths),
            "positions": cache.positions.tolist(), "rank": m.rank("sp"), "tp_rank": m.rank("tp"),
            "nbytes": cache.nbytes(), "hkv": cache.layers[0].k.shape[2]}


CASES = [  # world, degrees, strategy, layout, prompt length
    (2, {"sp": 2}, "ring", "contiguous", 40),
    (2, {"sp": 2}, "ring", "zigzag", 40),
    (4, {"sp": 4}, "ring", "contiguous", 40),
    (4, {"sp": 4}, "ring", "zigzag", 40),
    (4, {"sp": 4, "ulysses": 2}, "usp", "zigzag", 40),
    (4, {"sp": 4, "ulysses": 2}, "usp", "contiguous", 40),
    # lengths the layout cannot split: padded, the padding masked in prefill and never cached
    (4, {"sp": 4}, "ring", "zigzag", 37),
    (4, {"sp": 4, "ulysses": 2}, "usp", "contiguous", 37),
    (2, {"sp": 2}, "ring", "zigzag", 3),
    (4, {"sp": 4}, "ring", "zigzag", 3),  # 8 padded tokens: rank 3 holds only padding, an empty shard
]


def _check_against_reference(res, s, new, world_sp):
    ref_ids, ref_steps = _reference(s, new)
    for r in res:
        assert torch.equal(r["tokens"], ref_ids), (r["tokens"][:, s:], ref_ids[:, s:])
        for got, want in zip(r["logits"], ref_steps):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    sp_ranks = {r["rank"]: r for r in res if r["tp_rank"] == 0}
    assert len(sp_ranks) == world_sp
    # after prefill: rank r holds exactly its own real prompt tokens, no padding, nothing else
    every = sorted(p for r in sp_ranks.values() for p in r["prefill"]["positions"])
    assert every == list(range(s))
    for rank, r in sp_ranks.items():
        lengths = r["prefill"]["lengths"]
        assert lengths[rank] == len(r["prefill"]["positions"]) and sum(lengths) == s
        assert all(shape == (BATCH, lengths[rank], r["hkv"], 16) for shape in r["prefill"]["k_shapes"])
        assert r["prefill"]["nbytes"] == 2 * 2 * BATCH * lengths[rank] * r["hkv"] * 16 * 4  # 2 layers, k and v
    # after decoding new - 1 tokens (generate's last token is never fed back): balanced within one token
    lengths = res[0]["lengths"]
    assert all(r["lengths"] == lengths for r in res) and sum(lengths) == s + new - 1
    every = sorted(p for r in sp_ranks.values() for p in r["positions"])
    assert every == list(range(s + new - 1))
    return lengths


@pytest.mark.parametrize("world,degrees,strategy,layout,s", CASES,
                         ids=[f"w{w}-{st}-{lay}-S{s}" for w, _, st, lay, s in CASES])
def test_greedy_generation_equals_one_device(pool, world, degrees, strategy, layout, s):
    res = pool(world).run(run_inference, degrees, strategy, layout, s, NEW)
    lengths = _check_against_reference(res, s, NEW, world)
    if s % (2 * world) == 0:  # no padding: equal shards after prefill, within one token after decode
        assert all(len(r["prefill"]["positions"]) == s // world for r in res)
        assert max(lengths) - min(lengths) <= 1
    if layout == "contiguous" or strategy == "ring":
        for r in res:  # the prompt tokens a rank holds are the layout's
            idx = get_layout(layout).indices(-(-s // (2 * world)) * 2 * world, world, r["rank"])
            assert r["prefill"]["positions"] == [p for p in idx.tolist() if p < s]


def test_padding_imbalance_is_absorbed_by_decode(pool):
    # S=37 over 4 zigzag ranks: padded to 40 (chunks of 5), the 3 pads in rank 0's late chunk are not
    # cached, so the shards hold [7, 10, 10, 10]; decoded tokens go to the shortest shard first
    res = pool(4).run(run_inference, {"sp": 4}, "ring", "zigzag", 37, 8)
    lengths = _check_against_reference(res, 37, 8, 4)
    assert res[0]["prefill"]["lengths"] == [7, 10, 10, 10]
    assert lengths == [11, 11, 11, 11]


TP_CASES = [  # tensor parallelism: q/k/v heads split by tp, the cache holds Hkv/t heads
    (4, {"sp": 2, "tp": 2}, "ring", "zigzag", 37, True),
    (2, {"tp": 2}, "ring", "zigzag", 40, False),
]


@pytest.mark.parametrize("world,degrees,strategy,layout,s,sp_on", TP_CASES,
                         ids=[f"w{w}-{d}-{'sp' if on else 'nosp'}-S{s}" for w, d, _, _, s, on in TP_CASES])
def test_tensor_parallel_generation_equals_one_device(pool, world, degrees, strategy, layout, s, sp_on):
    res = pool(world).run(run_inference, degrees, strategy, layout, s, NEW, sp_on)
    _check_against_reference(res, s, NEW, world // degrees["tp"])
    assert all(r["hkv"] == 2 // degrees["tp"] for r in res)


def run_decode_traffic(prompt_lens: list[int]):
    m = mesh(sp=4)
    model = _model(m, "ring", "zigzag")
    out = []
    for s in prompt_lens:
        with seqpar.stats.track() as pre:
            cache, logits = prefill(model, _prompt(s), strategy="ring")
        with seqpar.stats.track() as dec:
            decode_step(model, cache, logits.argmax(-1))
        out.append({"prefill_calls": dict(pre.calls), "prefill_bytes": dict(pre.bytes),
                    "decode_calls": dict(dec.calls), "decode_bytes": dict(dec.bytes)})
    return out


def test_decode_sends_one_small_all_gather_per_layer(pool):
    lens = [16, 128]
    res = pool(4).run(run_decode_traffic, lens)
    layers, h, d = 2, 4, 16
    for r in res:
        small, large = r
        for step in (small, large):
            assert step["decode_calls"] == {"all_gather": layers}  # nothing else: no gather of the cache
            # per layer: [B, 1, H, D+1] float32 to each of the 3 other ranks
            assert step["decode_bytes"] == {"all_gather": layers * BATCH * h * (d + 1) * 4 * 3}
            # prefill: the ring's K/V traffic, then one all-reduce of the last token's hidden state [B, 1, 64]
            assert step["prefill_calls"]["all_reduce"] == 1
            assert step["prefill_bytes"]["all_reduce"] == BATCH * 64 * 4
            assert set(step["prefill_calls"]) == {"ring_exchange", "all_reduce"}
        assert small["decode_bytes"] == large["decode_bytes"]  # independent of the prompt length


# ---------------------------------------------------------------- one process: bad input, world 1


def test_world_one_equals_full_forward():
    model = _model(Mesh())
    ids = generate(model, _prompt(21), NEW)  # odd length on zigzag: padded by one, masked
    assert torch.equal(ids, _reference(21)[0])


def test_bad_input_names_the_fix():
    model = _model(Mesh())
    with pytest.raises(seqpar.ShapeError, match=r"prompt length 37 .* multiple of 2.*pad=True"):
        prefill(model, _prompt(37), pad=False)
    with pytest.raises(seqpar.ConfigError, match="unknown strategy 'rng'"):
        prefill(model, _prompt(8), strategy="rng")
    with pytest.raises(seqpar.ShapeError, match=r"full prompt as integer ids \[batch, seq\]"):
        prefill(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(seqpar.ShapeError, match="max_new_tokens"):
        generate(model, _prompt(8), -1)
    cache, logits = prefill(model, _prompt(8))
    with pytest.raises(seqpar.ShapeError, match=r"token_ids must be integer ids \[batch=2\]"):
        decode_step(model, cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(CacheError, match="must be a KVCache"):
        decode_step(model, {"k": None}, logits.argmax(-1))
    with pytest.raises(seqpar.ConfigError, match="or a Hugging Face causal LM prepared by"):
        prefill(torch.nn.Linear(2, 2), _prompt(8))
    other = LlamaForCausalLM("tiny", mesh=Mesh()).eval()
    other.layers = other.layers[:1]
    with pytest.raises(CacheError, match="2 layers filled for a model of 1"):
        decode_step(other, cache, logits.argmax(-1))


def test_failed_decode_step_leaves_the_cache_unchanged():
    model = _model(Mesh())
    cache, logits = prefill(model, _prompt(8))
    before = (list(cache.lengths), [layer.len for layer in cache.layers])
    with pytest.raises(seqpar.ShapeError, match="token ids must lie in"):
        decode_step(model, cache, torch.full((BATCH,), 1000))
    assert (list(cache.lengths), [layer.len for layer in cache.layers]) == before
    assert isinstance(cache, KVCache) and cache.seq_len == 8


def run_world_one_inside_job(s: int):
    mesh(sp=2)  # a default mesh with a real sp group is set in this process
    return generate(_model(Mesh()), _prompt(s), NEW, Mesh())


def test_world_one_mesh_stays_local_inside_a_distributed_job(pool):
    # mesh=Mesh() must not fall back to the process's default group (rank 0 alone would wait forever)
    for ids in pool(2).run(run_world_one_inside_job, 21):
        assert torch.equal(ids, _reference(21)[0])
