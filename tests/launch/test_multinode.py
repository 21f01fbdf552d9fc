"""Two torchrun agents (``--nnodes 2``, c10d rendezvous on loopback) form one world: ``seqpar train`` trains,
saves and resumes at another layout, as on two machines."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from seqpar.train.metrics import read_metrics
from seqpar.train.trainer import TrainConfig, train

pytestmark = pytest.mark.slow  # two launches of two torchrun agents

TORCHRUN = Path(sys.executable).with_name("torchrun")
SRC = Path(__file__).resolve().parents[2] / "src"
BASE = {"model": "tiny", "seq_len": 64, "micro_batch": 2, "lr": 0.01, "log_every": 1, "eval_batches": 1,
        "data": {"kind": "recall", "pairs": 4}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, cfg: dict) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if k != "data"]
    lines += ["[data]"] + [f"{k} = {json.dumps(v)}" for k, v in cfg["data"].items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _two_nodes(config: str, per_node: int, tmp: Path) -> str:
    """Launch two agents of ``per_node`` ranks each on one rendezvous; returns their joined stdout."""
    port, job = _free_port(), uuid.uuid4().hex[:8]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job, "--max-restarts", "0",
           "-m", "seqpar.cli", "train", config]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
              for _ in range(2)]
    outs = []
    try:
        for a in agents:
            out, err = a.communicate(timeout=420)
            outs.append((a.returncode, out, err))
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for rc, out, err in outs:
        assert rc == 0, f"agent failed ({rc}):\n{out[-2000:]}\n{err[-3000:]}"
    return "".join(out for _, out, _ in outs)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside the Python executable")
def test_two_nodes_train_save_and_resume_at_another_layout(tmp_path):
    """Two launches of two agents (one rank each: every process start costs seconds on a 2-core CI box).
    Rerunning a finished run and saving the last step are tested in one process (tests/train/test_runs.py)."""
    ck = tmp_path / "ck"
    straight = train(TrainConfig.from_dict({**BASE, "steps": 5})).losses  # one process, uninterrupted
    # 2 nodes x 1 rank, tp=2; 3 steps with save_every = 2: saved at 2 and at the last step, 3
    first = {**BASE, "steps": 3, "save_every": 2, "tp": 2, "strategy": "ring", "checkpoint_dir": str(ck)}
    out = _two_nodes(_write(tmp_path / "first.toml", first), 1, tmp_path)
    assert "done: final loss" in out and out.count("done: final loss") == 1  # global rank 0 reports once
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-2", "step-3"]
    # resumed at sp=2 with ulysses, no tp: steps 4 and 5 are the uninterrupted run's
    second = {**BASE, "steps": 5, "save_every": 2, "strategy": "ulysses", "checkpoint_dir": str(ck)}
    out = _two_nodes(_write(tmp_path / "second.toml", second), 1, tmp_path)
    assert "done (resumed at step 3)" in out
    records = read_metrics(ck)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == pytest.approx(straight, rel=1e-5)
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-2", "step-3", "step-4", "step-5"]
