"""Hypothesis over shapes, tp degrees and sequence parallelism: the tp MLP equals one device, fwd and bwd."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from seqpar import tp
from seqpar.launch.pool import get_pool
from tests.helpers import mesh


def w_fuzz(tp_degree: int, sp_on: bool, b: int, s: int, h: int, ff: int, seed: int) -> float:
    """Each rank compares its shards with the single-device MLP it also computes; returns the max error."""
    m = mesh(tp=tp_degree)
    t, r = m.tp, m.rank("tp")
    g = torch.Generator().manual_seed(seed)
    fc1, fc2 = nn.Linear(h, ff).double(), nn.Linear(ff, h).double()
    with torch.no_grad():
        for p in list(fc1.parameters()) + list(fc2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(b, s, h, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    y = fc2(F.gelu(fc1(x)))
    y.backward(dy)
    up = tp.ColumnParallelLinear.from_full(fc1, mesh=m, sequence_parallel=sp_on)
    down = tp.RowParallelLinear.from_full(fc2, mesh=m, sequence_parallel=sp_on)
    xs = (x.detach().chunk(t, 1)[r] if sp_on else x.detach()).clone().requires_grad_()
    ys = down(F.gelu(up(xs)))
    ys.backward(dy.chunk(t, 1)[r] if sp_on else dy)
    tp.sync_sequence_parallel_grads(nn.ModuleList([up, down]), m)
    pairs = [(ys, y.chunk(t, 1)[r] if sp_on else y), (xs.grad, x.grad.chunk(t, 1)[r] if sp_on else x.grad),
             (up.weight.grad, fc1.weight.grad.chunk(t, 0)[r]), (up.bias.grad, fc1.bias.grad.chunk(t, 0)[r]),
             (down.weight.grad, fc2.weight.grad.chunk(t, 1)[r]), (down.bias.grad, fc2.bias.grad)]
    return max((a.detach() - e).abs().max().item() for a, e in pairs)


@given(tp_degree=st.sampled_from([1, 2, 4]), sp_on=st.booleans(), b=st.integers(1, 3), s_per=st.integers(1, 4),
       h=st.integers(1, 12), ff_per=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_tp_mlp_fuzz(tp_degree, sp_on, b, s_per, h, ff_per, seed):
    errs = get_pool(tp_degree).run(w_fuzz, tp_degree, sp_on, b, s_per * tp_degree, h, ff_per * tp_degree, seed)
    assert max(errs) < 1e-10, errs
