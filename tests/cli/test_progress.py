"""Progress: a live bar on a terminal; plain log lines in a pipe, a file or under CI; each format tested."""
from __future__ import annotations

import pytest

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from seqpar.cli.progress import Progress, describe, is_live


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(bar: Progress, steps: int = 3) -> None:
    for i in range(1, steps + 1):
        info = {"step": i, "loss": 2.0 / i, "tokens_per_s": 1500.0, "peak_mem_mb": [100.0, 120.0]}
        bar.step(info)
        bar.line(info)
    bar.close()


def test_a_terminal_gets_a_live_bar_unless_ci_or_dumb(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert is_live(_Terminal()) and not is_live(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not is_live(_Terminal())
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "dumb")
    assert not is_live(_Terminal())


def test_live_bar_shows_step_loss_rate_memory_and_time_left():
    out = _Terminal()
    _run(Progress(3, "train", stream=out, live=True))
    text = out.getvalue()
    assert "\x1b[" in text and "3/3" in text  # drawn with terminal control codes
    assert "loss 0.6667" in text and "1.5k tok/s" in text and "peak mem 120 MB/rank" in text
    assert "left" in text


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    _run(Progress(3, "train", stream=out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\x1b[" not in out.getvalue()
    assert lines[0].startswith("train step 1/3  loss 2.0000  1.5k tok/s  peak mem 120 MB/rank  elapsed ")
    assert all(" left " in line for line in lines)


def test_describe_names_only_what_it_has():
    assert describe({"what": "ring at world 2"}) == "ring at world 2"
    assert describe({"loss": 1.5, "peak_mem_mb": 64.0}) == "loss 1.5000  peak mem 64 MB"


def _train_config(tmp_path: Path) -> str:
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "tiny"\nseq_len = 64\nmicro_batch = 2\nsteps = 4\nlog_every = 2\n'
                   f'log_dir = "{tmp_path / "logs"}"\n')
    return str(cfg)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "WORLD_SIZE", "RANK")}
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**env, "PYTHONPATH": src + os.pathsep + env.get("PYTHONPATH", ""), "TERM": "xterm", **extra}


@pytest.mark.slow
def test_seqpar_train_on_a_terminal_draws_the_bar_and_in_a_pipe_logs_lines(tmp_path):
    cmd = [sys.executable, "-m", "seqpar.cli", "train", _train_config(tmp_path)]
    main, child = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=child, stderr=child, stdin=child, env=_env(COLUMNS="160"), cwd=tmp_path)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(timeout=120) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in shown and "4/4" in shown and "loss" in shown and "tok/s" in shown, shown[-2000:]
    assert "train step 2/4" not in shown  # no log lines on a terminal: the bar
    piped = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "train step 2/4  loss " in piped.stdout and "train step 4/4  loss " in piped.stdout
    assert "\x1b[" not in piped.stdout  # (CI=true on a terminal: plain lines too, see is_live above)
