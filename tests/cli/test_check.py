"""``seqpar check``: every strategy on the user's shapes, its error table, and bad shapes refused up front."""
from __future__ import annotations

import argparse

import pytest

from seqpar.cli import main
from seqpar.cli.check import KEYS, STRATEGIES, _report, plan_cases


def test_small_shapes_on_two_ranks_pass_and_list_every_strategy(capsys):
    rc = main(["check", "--nproc", "2", "--seq-len", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    main_table = out.split("largest error")[0]
    for s in ("ring", "ulysses", "allgather", "ring_qk_av"):
        assert any(line.startswith(s) and line.rstrip().endswith("ok") for line in main_table.splitlines()), s
    assert any(line.split()[:3] == ["usp", "2", "skipped:"] and "no 2-D split of 2 ranks" in line
               for line in main_table.splitlines())
    assert "world 1" in out and "world 2" in out and "all strategies within tolerance" in out


def test_packed_windowed_uneven_input_is_padded_and_exact(capsys):
    rc = main(["check", "--nproc", "2", "--cu-seqlens", "0", "13", "40", "41", "61", "--window", "8", "0",
               "--heads", "4", "--kv-heads", "1", "--head-dim", "8", "--batch", "2", "--strategies", "ring",
               "ulysses"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "documents=4" in out and "(padded" in out


def _ns(**kw) -> argparse.Namespace:
    base = dict(heads=8, kv_heads=2, ulysses=None, strategies=list(STRATEGIES))
    base.update(kw)
    return argparse.Namespace(**base)


def test_cases_follow_the_planner():
    cases = {s: (u, why) for s, u, why in plan_cases(_ns(heads=6, kv_heads=6), 4)}
    assert cases["ring"] == (None, "") and cases["allgather"] == (None, "") and cases["ring_qk_av"] == (None, "")
    assert "heads=6, kv=6 not divisible by 4 ranks" in cases["ulysses"][1]
    assert cases["usp"] == (2, "")  # 6 heads split 2 ways, ring of 2 across
    assert plan_cases(_ns(), 8)[3] == ("usp", 4, "")  # the largest ulysses degree that fits
    assert plan_cases(_ns(ulysses=2), 8)[3] == ("usp", 2, "")
    assert "no 2-D split" in plan_cases(_ns(), 2)[3][2]


def test_error_table_rows_and_failure_status(capsys):
    """A strategy above tolerance is reported as FAIL (and exit status 1); skips keep their row."""
    ns, spec = _ns(strategies=["ring", "ulysses", "usp"]), dict(batch=1, seq_len=64, heads=8, kv_heads=2,
                                                                 head_dim=8, dtype="float32", causal=True,
                                                                 layout="zigzag", window=None, cu_seqlens=None)
    tol = {k: 1e-5 for k in KEYS}
    good = {k: 1e-6 for k in KEYS}
    bad = dict(good, dk=3e-2)
    errs = {("ring", 1): good, ("ring", 2): good, ("ulysses", 1): good, ("ulysses", 2): bad}
    rows = [("ring", 1, None, dict(good, padding=0), ""), ("ulysses", 1, None, dict(good, padding=0), ""),
            ("usp", 1, None, None, "no 2-D split"), ("ring", 2, None, dict(good, padding=0), ""),
            ("ulysses", 2, None, dict(bad, padding=0), ""), ("usp", 2, None, None, "no 2-D split of 2 ranks")]
    assert _report(ns, spec, [1, 2], tol, errs, rows) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("ring") and line.endswith("ok") for line in lines)
    assert any(line.split()[:2] == ["ulysses", "2"] and line.endswith("FAIL: dk") for line in lines)
    assert any(line.split()[:3] == ["usp", "2", "skipped:"] and line.endswith("no 2-D split of 2 ranks")
               for line in lines)
    assert "FAILED: 1 error(s) above tolerance: ulysses@2:dk" in out
    grid = out.split("by world size:")[1].splitlines()
    assert grid[1].split() == ["strategy", "world", "1", "world", "2"]
    assert [line.split()[0] for line in grid[2:5]] == ["ring", "ulysses", "usp"]
    assert "(3000.00)" in grid[3] and grid[4].split()[1:] == ["skipped", "skipped"]


@pytest.mark.parametrize("argv,message", [
    (["--heads", "6", "--kv-heads", "4"], "--heads 6 must be a multiple of --kv-heads 4"),
    (["--heads", "8", "--ulysses", "3"], "--heads 8 is not divisible by --ulysses 3: choose --ulysses from 2"),
    (["--nproc", "4", "--ulysses", "4"], "--ulysses 4 must divide the world (4 ranks) and lie strictly between"),
    (["--cu-seqlens", "0", "10", "5"], "must start at 0 and increase strictly"),
    (["--cu-seqlens", "0", "10", "50", "--seq-len", "64"], "--cu-seqlens ends at 50 but --seq-len is 64"),
    (["--window", "-3", "0"], "--window -3 0"),
])
def test_invalid_shapes_exit_2_before_any_rank_starts(capsys, argv, message):
    assert main(["check", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("seqpar check: error: ") and message in err, err
