"""Token choice in generate: sampling (temperature, top-k, top-p) and eos stopping, the same on every rank."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.inference import Sampler, generate
from seqpar.core.mesh import Mesh
from tests.helpers import mesh
from tests.inference.test_inference import NEW, _model, _prompt, _reference


def test_warp_filters_like_hf():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(Sampler(top_k=2).warp(logits), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p=0.8: 0.5 + 0.2 < 0.8, so 0.15 is needed too; the 0.1 and 0.05 tokens go
    assert torch.allclose(Sampler(top_p=0.8).warp(logits), torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    assert torch.allclose(Sampler(top_p=0.3).warp(logits), torch.tensor([[1.0, 0, 0, 0, 0]]))  # the first stays
    hot = Sampler(temperature=0.5).warp(logits)
    assert torch.allclose(hot, torch.tensor([[0.25, 0.04, 0.0225, 0.01, 0.0025]]) / 0.325)
    for bad in ({"temperature": 0.0, "do_sample": True}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(seqpar.ConfigError):
            Sampler(**bad)
    Sampler(temperature=0.0)  # greedy: the temperature is unused, as in HF


SAMPLE = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)


def run_sampled(degrees: dict, strategy: str, s: int):
    m = mesh(**degrees)
    return generate(_model(m, strategy), _prompt(s), NEW, strategy=strategy, **SAMPLE)


@pytest.mark.parametrize("world,degrees,strategy", [(2, {"sp": 2}, "ring"), (4, {"sp": 2, "tp": 2}, "ring"),
                                                    (4, {"sp": 4, "ulysses": 2}, "usp")],
                         ids=["sp2", "sp2-tp2", "usp2x2"])
def test_sampling_is_seeded_and_equal_on_every_rank(pool, world, degrees, strategy):
    want = generate(_model(Mesh(), layout="contiguous"), _prompt(40), NEW, **SAMPLE)
    assert not torch.equal(want, _reference(40)[0])  # sampling chose differently from greedy
    for ids in pool(world).run(run_sampled, degrees, strategy, 40):
        assert torch.equal(ids, want)


def run_eos(s: int, eos: int):
    m = mesh(sp=2)
    return generate(_model(m), _prompt(s), NEW, eos_token_id=eos, pad_token_id=-1)


def test_eos_stops_each_sequence_and_generation(pool):
    ref = _reference(40)[0]
    new = ref[:, 40:]
    eos = int(new[0, 1])  # sequence 0 ends at its second new token
    first = [next((i for i, t in enumerate(row.tolist()) if t == eos), None) for row in new]
    for ids in pool(2).run(run_eos, 40, eos):
        stop = max(len(new[0]) - 1 if f is None else f for f in first) + 1  # everyone stopped, or max length
        assert ids.shape == (2, 40 + stop)
        for b, f in enumerate(first):
            end = stop if f is None else f + 1
            assert torch.equal(ids[b, :40 + end], ref[b, :40 + end])  # greedy up to and with the eos
            assert (ids[b, 40 + end:] == -1).all()  # then padding


def run_eos_list(s: int, eos: list[int]):
    return generate(_model(mesh(sp=2)), _prompt(s), NEW, eos_token_id=eos)


def test_generation_ends_once_every_sequence_stopped(pool):
    ref = _reference(40)[0]
    eos = [int(ref[0, 41]), int(ref[1, 40])]  # sequence 0 stops at its 2nd new token, sequence 1 at its 1st
    for ids in pool(2).run(run_eos_list, 40, eos):
        assert ids.shape == (2, 42)
        assert torch.equal(ids[0], ref[0, :42]) and ids[1, 40] == ref[1, 40] and ids[1, 41] == eos[0]  # padded
