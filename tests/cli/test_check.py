"""``seqpar check``: every strategy on the user's shapes, its error table, and bad shapes refused up front."""
from __future__ import annotations

import argparse

import pytest
import torch

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
    base = dict(heads=8, kv_heads=2, ulysses=None, strategies=list(STRATEGIES), batch=1, seq_len=1024,
                dtype="float32")
    base.update(kw)
    return argparse.Namespace(**base)


def test_cases_follow_the_planner():
    cases = {s: (u, why) for s, u, why in plan_cases(_ns(heads=6, kv_heads=6), 4)}
    assert cases["ring"] == (None, "") and cases["allgather"] == (None, "") and cases["ring_qk_av"] == (None, "")
    assert cases["ulysses"] == (None, "")  # run with its heads padded (6 -> 8), as seqpar.attention does
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
    assert "(3000.00)" in grid[3] and grid[4].split()[1:] == ["skipped", "(1)", "skipped", "(2)"]
    assert "(1) skipped: no 2-D split" in out and "(2) skipped: no 2-D split of 2 ranks" in out


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


def test_ulysses_with_heads_that_do_not_divide_is_run_padded_and_says_so(capsys):
    """It was skipped without a word; seqpar.attention pads the heads, so check runs what a user would."""
    rc = main(["check", "--nproc", "4", "--seq-len", "64", "--heads", "6", "--kv-heads", "6", "--head-dim", "8",
               "--strategies", "ulysses", "usp"])
    out = capsys.readouterr().out
    assert rc == 0, out
    row = next(line for line in out.splitlines() if line.startswith("ulysses") and line.split()[1] == "4")
    assert "ok" in row and "(heads padded 6->8 over 4 ranks)" in row
    grid = out.split("by world size:")[1]
    assert "skipped (1)" in grid and "skipped (2)" in grid  # every skip says why
    assert "(1) skipped: no 2-D split of 1 ranks" in grid and "(2) skipped: no 2-D split of 2 ranks" in grid


def test_the_reference_streams_query_blocks_and_equals_one_call(monkeypatch):
    """Memory O(S x block): the README's 8k-token check no longer builds [S, S] float64 per head."""
    from seqpar.cli import check

    spec = dict(batch=2, seq_len=40, heads=4, kv_heads=2, head_dim=8, dtype="float32", causal=True,
                cu_seqlens=[0, 13, 40], window=[9, 0], layout="zigzag", seed=0, device="cpu")
    whole = check.reference(spec)
    monkeypatch.setattr(check, "REFERENCE_BLOCK_BYTES", 8 * 2 * 40 * 7)  # blocks of 7 query rows
    blocks = check.reference(spec)
    for key in KEYS:
        assert torch.allclose(blocks[key], whole[key], rtol=0, atol=1e-12), key


def test_ring_qk_av_too_big_for_the_machine_is_skipped_with_the_reason(monkeypatch):
    from seqpar.cli import check

    monkeypatch.setattr(check, "_memory_budget", lambda: 8 * 2**30)
    cases = {s: why for s, _, why in plan_cases(_ns(heads=32, kv_heads=8, seq_len=8192), 4)}
    assert "materialises B*H*S^2 scores (32.0 GiB in all)" in cases["ring_qk_av"]
    assert "lower --seq-len or --heads" in cases["ring_qk_av"]
    assert cases["ring"] == "" and cases["ulysses"] == ""
    assert {s: why for s, _, why in plan_cases(_ns(seq_len=1024), 4)}["ring_qk_av"] == ""


def test_device_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "cuda", "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqpar check: error: --device cuda but this machine has no CUDA device")
    assert "Traceback" not in err
