"""Bad sizes and options raise a SeqParError on every rank before any collective is issued."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar import tp
from tests.helpers import mesh

# name -> (expected exception, substring of the message)
EXPECTED = {
    "column_out": ("ShapeError", "out_features=5 is not divisible by the tensor-parallel size"),
    "row_in": ("ShapeError", "in_features=5 is not divisible by the tensor-parallel size"),
    "vocab": ("ShapeError", "pad the vocabulary to a multiple of"),
    "embedding_seq": ("ShapeError", "sequence length 5"),
    "row_seq": ("ShapeError", "sequence length 5"),
    "column_features": ("ShapeError", "must have 8 features"),
    "gather_and_sp": ("ConfigError", "gather_output=True and sequence_parallel=True"),
    "row_sp_replicated_input": ("ConfigError", "needs input_is_parallel=True"),
    "ce_target_shape": ("ShapeError", "target shape"),
    "ce_target_range": ("ShapeError", "target ids must lie in [0, 16)"),
    "ce_reduction": ("ConfigError", "reduction='avg'"),
    "embedding_ids": ("ShapeError", "token ids must lie in [0, 16)"),
    "fork_unknown": ("ConfigError", "unknown RNG stream"),
}


def w_errors(tp_degree: int):
    m = mesh(tp=tp_degree)
    t = m.tp
    emb = tp.VocabParallelEmbedding(16, 4, mesh=m, sequence_parallel=True)
    row = tp.RowParallelLinear(8, 4, mesh=m, sequence_parallel=True)
    col = tp.ColumnParallelLinear(8, 8, mesh=m)
    logits = torch.randn(2, 3, 16 // t)
    cases = {
        "column_out": lambda: tp.ColumnParallelLinear(8, 5, mesh=m),
        "row_in": lambda: tp.RowParallelLinear(5, 8, mesh=m),
        "vocab": lambda: tp.VocabParallelEmbedding(5, 4, mesh=m),
        "embedding_seq": lambda: emb(torch.zeros(2, 5, dtype=torch.long)),
        "row_seq": lambda: row(torch.randn(2, 5, 8 // t)),
        "column_features": lambda: col(torch.randn(2, 4, 6)),
        "gather_and_sp": lambda: tp.ColumnParallelLinear(8, 8, mesh=m, sequence_parallel=True, gather_output=True),
        "row_sp_replicated_input": lambda: tp.RowParallelLinear(8, 8, mesh=m, sequence_parallel=True,
                                                                input_is_parallel=False),
        "ce_target_shape": lambda: tp.vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long),
                                                                   group=m.tp_group),
        "ce_target_range": lambda: tp.vocab_parallel_cross_entropy(logits, torch.full((2, 3), 16),
                                                                   group=m.tp_group),
        "ce_reduction": lambda: tp.vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long),
                                                                group=m.tp_group, reduction="avg"),
        "embedding_ids": lambda: emb(torch.full((2, 4), 16)),
        "fork_unknown": lambda: tp.RNGStatesTracker().fork("nope").__enter__(),
    }
    out = {}
    for name, fn in cases.items():
        with seqpar.stats.track() as st:
            try:
                fn()
                out[name] = (None, "no error", dict(st.calls))
            except seqpar.SeqParError as e:
                out[name] = (type(e).__name__, str(e), dict(st.calls))
    return out


@pytest.mark.parametrize("world,tp_degree", [(2, 2), (4, 4), (4, 2)], ids=["w2-tp2", "w4-tp4", "w4-tp2-sp2"])
def test_bad_sizes_raise_on_every_rank_before_any_collective(pool, world, tp_degree):
    for rank, out in enumerate(pool(world).run(w_errors, tp_degree)):
        assert out.keys() == EXPECTED.keys()
        for name, (exc, needle) in EXPECTED.items():
            got, msg, calls = out[name]
            assert got == exc and needle in msg, (rank, name, msg)
            assert calls == {}, (rank, name, calls)


def test_divisibility_message_names_the_fix():
    with pytest.raises(seqpar.ShapeError, match="positive integer"):
        tp.ColumnParallelLinear(0, 4)
    m = seqpar.Mesh(tp=1)
    assert tp.VocabParallelEmbedding(5, 4, mesh=m).per_rank == 5  # any vocab at tp=1
