"""Bad input ends every command with one line naming the problem and its fix, and exit status 2: no traceback."""
from __future__ import annotations

import pytest
import torch

from seqpar.cli import main, user_error
from seqpar.launch.pool import RemoteException, WorkerError


def _one_line(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"seqpar {command}: error: "), err
    return lines[0]


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\nseq_len = 64\nmicro_batch = 2\nsteps = 2\n' + text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ('[data]\nkind = "tokens"\npath = "missing.bin"\n', "token file 'missing.bin' does not exist"),
    ('strategy = "rign"\n', "strategy = 'rign': use one of ring, ulysses"),
    ('[data]\nkind = "recall"\npairs = 4\npairz = 2\n', r"unknown key(s) ['pairz'] in [data]"),
    ('device = "cuda"\n', "device = 'cuda' but this machine has no CUDA device"),
    ("steps = = 3\n", "is not valid TOML"),
])
def test_train_bad_config(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", _config(tmp_path, text)]) == 2
    assert message in _one_line(capsys, "train")


def test_train_missing_config_file(capsys):
    assert main(["train", "no-such-run.toml"]) == 2
    assert "config file 'no-such-run.toml' does not exist" in _one_line(capsys, "train")


@pytest.mark.parametrize("flags,message", [
    (["--pairs", "0"], "pairs=0 must be >= 1"),
    (["--pairs", "9", "--keys", "4"], "9 pairs need 9 distinct keys but keys=4"),
    (["--pairs", "2"], "2 pairs need 2 distinct keys but keys=1"),
    (["--device", "cuda"], "device = 'cuda' but this machine has no CUDA device"),
    (["--nproc", "3", "--tp", "2"], "--nproc 3 is not divisible by --tp 2"),
    (["--strategy", "usp"], "--strategy usp needs 1 < --ulysses < 4"),
    (["--seq-len", "40", "--repeat", "32", "--pairs", "4", "--keys", "4"], "seq_len=40 cannot hold 4 facts x 32 copies"),
])
def test_demo_bad_flags(capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", *flags]) == 2
    assert message in _one_line(capsys, "demo")


def test_a_strategy_typo_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--strategy", "rign"])
    assert e.value.code == 2 and "invalid choice: 'rign'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--prompt-file", "missing.txt", "--model", "."], "--prompt-file 'missing.txt' does not exist"),
    (["--model", "/no/such/model"], "--model '/no/such/model' is neither a directory nor a model"),
    (["--device", "cuda"], "--device cuda but this machine has no CUDA device"),
])
def test_generate_bad_flags(capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", *flags]) == 2
    assert message in _one_line(capsys, "generate")


def test_errors_raised_on_the_ranks_of_a_pool_are_one_line():
    same = {r: RemoteException(r, "ConfigError", "pairs=0 must be >= 1", "Traceback ...") for r in range(2)}
    assert user_error(WorkerError("task failed", same)) == "pairs=0 must be >= 1"
    one = {1: RemoteException(1, "ShapeError", "bad shape", "Traceback ...")}
    assert user_error(WorkerError("task failed", one)) == "rank 1: bad shape"
    bug = {0: RemoteException(0, "ZeroDivisionError", "division by zero", "Traceback ...")}
    assert user_error(WorkerError("task failed", bug)) is None  # a bug keeps its traceback
    assert user_error(ValueError("x")) is None
