"""``seqpar demo``: a needle asked for from far away, exact in float64 against one process, measured activation
memory per rank, training curves overlaid, accuracy on held-out sequences, a plot with the ``plot`` extra and a
table without it."""
from __future__ import annotations

import argparse
import builtins
import re

import pytest

from seqpar.cli import build_parser, main
from seqpar.cli.demo import _how_far, _plot_or_table, _validate


def _no_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_demo_small_run_is_exact_measures_memory_and_prints_a_table_without_matplotlib(capsys, monkeypatch, tmp_path):
    _no_matplotlib(monkeypatch)
    rc = main(["demo", "--nproc", "2", "--seq-len", "256", "--steps", "3", "--micro-batch", "1", "--repeat", "4",
               "--plot", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert rc == 0, out
    loss_rel, grad_rel = (float(x) for x in re.findall(r"relative difference ([0-9.e+-]+)", out)[:2])
    assert loss_rel < 1e-12 and grad_rel < 1e-12  # float64: the same computation, summed in another order
    one = float(re.search(r"one process\s+([0-9.]+) MiB", out).group(1))
    ranks = [float(x) for x in re.findall(r"rank \d of 2\s+([0-9.]+) MiB", out)]
    assert len(ranks) == 2 and all(0.4 * one < r < 0.6 * one for r in ranks), out  # each rank saves about half
    assert "float32 loss curves: relative difference" in out and "float32 rounding" in out
    assert "pip install 'seqpar[plot]'" in out and not (tmp_path / "demo.png").exists()
    assert re.search(r"^\s+3\s+[0-9.]+\s+[0-9.]+", out, re.M)  # the table's last step, both runs
    assert "needle retrieval across 256-token sequences" in out
    assert re.search(r"accuracy [0-9.]+ on the 512 questions of 8 held-out sequences \(never trained on; chance "
                     r"0\.125\)", out), out


def test_the_default_needle_lies_far_from_its_questions_mostly_on_another_rank():
    ns = build_parser().parse_args(["demo"])
    _validate(ns)  # the defaults make a valid run
    assert ns.seq_len >= 4096 and ns.nproc == 4
    far, other = _how_far(ns, ns.nproc)
    assert far > ns.seq_len / 4 and other > 0.5  # a question is answered from thousands of tokens back


def test_usp_flags_still_run(capsys, tmp_path, monkeypatch):
    _no_matplotlib(monkeypatch)
    rc = main(["demo", "--strategy", "usp", "--ulysses", "2", "--seq-len", "128", "--steps", "2", "--micro-batch", "1",
               "--repeat", "4", "--questions", "8", "--eval-batches", "1", "--no-reference",
               "--plot", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "strategy=usp, sp=4 (ulysses=2)" in out and "rank 3 of 4" in out and "one process" in out


def test_with_matplotlib_the_plot_shows_loss_memory_and_time(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ns = argparse.Namespace(nproc=2, strategy="ring", plot=str(tmp_path / "demo.png"))
    steps = [(3.0, 0.5), (2.5, 0.4), (2.0, 0.4)]
    _plot_or_table(ns, steps, [(3.0, 0.9), (2.5, 0.8), (2.0, 0.8)], {"one": (2**21, 2**19),
                                                                     "ranks": [(2**20, 2**18)] * 2})
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "plot: " in capsys.readouterr().out
