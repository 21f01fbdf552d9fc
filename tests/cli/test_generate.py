"""``seqpar generate``: an HF model's generation over local ranks equals HF's generate; bad flags refused."""
from __future__ import annotations

import argparse

import pytest

pytest.importorskip("transformers", minversion="4.53", reason="needs transformers>=4.53")

from seqpar.cli import main  # noqa: E402
from seqpar.core.errors import SeqParError  # noqa: E402


@pytest.mark.parametrize("flags", [["--nproc", "2"], ["--nproc", "4", "--strategy", "usp", "--ulysses", "2",
                                                      "--layout", "contiguous"]], ids=["ring2", "usp2x2"])
def test_generation_equals_hf_on_one_process(capsys, flags):
    rc = main(["generate", *flags, "--prompt-len", "300", "--max-new-tokens", "6", "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "300 prompt tokens over sp=" in out and "HF generate on one process: the same tokens" in out
    assert "KV cache per rank" in out and "new ids: [" in out


def test_sampling_runs(capsys):
    rc = main(["generate", "--nproc", "2", "--prompt-len", "64", "--max-new-tokens", "4", "--do-sample",
               "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    assert rc == 0 and "4 new tokens" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "hello"], "a text prompt needs --model"),
    (["--strategy", "usp", "--nproc", "4"], "--strategy usp needs 1 < --ulysses < --nproc"),
    (["--nproc", "3", "--ulysses", "2"], "--nproc 3 is not divisible by --ulysses 2"),
    (["--check", "--do-sample"], "--check compares greedy generation"),
    (["--do-sample", "--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
])
def test_bad_flags_are_named_before_any_process_starts(capsys, flags, message):
    assert main(["generate", *flags]) == 2
    assert message in capsys.readouterr().err


def test_under_torchrun_the_world_size_counts_not_nproc(monkeypatch, capsys):
    from seqpar.cli.generate import _validate

    monkeypatch.setenv("WORLD_SIZE", "8")
    main_ns = argparse.Namespace(prompt=None, prompt_file=None, model=None, check=False, do_sample=False,
                                 max_new_tokens=4, prompt_len=16, nproc=4, ulysses=4, strategy="usp",
                                 temperature=1.0, top_k=None, top_p=None, seed=0)
    _validate(main_ns)  # 2-D: 4 x 2 on 8 ranks, whatever --nproc says
    main_ns.ulysses = 3
    with pytest.raises(SeqParError, match="the world size 8 is not divisible by --ulysses 3"):
        _validate(main_ns)


@pytest.mark.slow
def test_under_torchrun():
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "seqpar.cli", "generate",
                          "--prompt-len", "100", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "100 prompt tokens over sp=2 ranks" in out.stdout and out.stdout.count("new ids") == 1  # rank 0 reports
