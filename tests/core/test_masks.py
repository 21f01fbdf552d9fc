"""block_tasks covers exactly the visible (query, key) pairs, each once."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from seqpar.core.masks import TokenMeta, block_tasks, visible


def _coverage(tasks, lq, lk):
    cov = torch.zeros(lq, lk, dtype=torch.long)
    for t in tasks:
        rows = torch.arange(lq)[t.q].unsqueeze(1)
        cols = torch.arange(lk)[t.k].unsqueeze(0)
        if t.bias is not None:
            vis = t.bias == 0
        elif t.causal:
            vis = (cols - t.k.start) <= (rows - t.q.start) + t.offset
        else:
            vis = torch.ones(rows.shape[0], cols.shape[1], dtype=torch.bool)
        cov[t.q, t.k] += vis.long()
    return cov


def _meta(lengths, padding, order_seed):
    pos, doc = [], []
    for d, (n, p) in enumerate(zip(lengths, padding)):
        pos += list(range(n + p))
        doc += [d] * n + [-1] * p
    meta = TokenMeta(torch.tensor(pos), torch.tensor(doc))
    if order_seed is None:
        return meta
    # cut into chunks and shuffle them, as layouts do
    idx = torch.arange(len(pos)).split(max(1, len(pos) // 4))
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(order_seed))
    sel = torch.cat([idx[i] for i in order])
    return TokenMeta(meta.pos[sel], meta.doc[sel])


@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4), pad=st.integers(0, 3),
       causal=st.booleans(), left=st.integers(-1, 30), right=st.integers(-1, 30), use_window=st.booleans(),
       qseed=st.one_of(st.none(), st.integers(0, 99)), kseed=st.one_of(st.none(), st.integers(0, 99)))
def test_tasks_cover_the_mask_exactly_once(lengths, pad, causal, left, right, use_window, qseed, kseed):
    padding = [pad] * len(lengths)
    qm, km = _meta(lengths, padding, qseed), _meta(lengths, padding, kseed)
    window = (left, right) if use_window else None
    cov = _coverage(block_tasks(qm, km, causal, window), qm.pos.numel(), km.pos.numel())
    assert torch.equal(cov, visible(qm, km, causal, window).long())


def test_documents_of_long_runs_are_fused_calls():
    m = _meta([200, 300], [0, 0], None)
    tasks = block_tasks(m, m, True)
    assert len(tasks) == 2 and all(t.bias is None and t.causal for t in tasks)
