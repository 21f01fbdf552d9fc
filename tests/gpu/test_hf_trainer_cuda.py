"""The seqpar Trainer on the GPU: device placement, CUDA kernels under bf16 autocast, DDP over CUDA tensors.

Run by ``benchmarks/gpu_checks.sh`` (step ``tests``).  ``SEQPAR_TEST_DEVICE`` as in test_cuda.py: on a CPU-only
machine the one-process checks run on CPU (seconds), the two-rank check is left to
tests/integrations/test_trainer.py.  Two ranks share cuda:0 over gloo (NCCL refuses two ranks on one GPU), with
the ulysses strategy (gloo cannot send CUDA tensors point to point; all-to-all works).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers", minversion="4.53")
pytest.importorskip("accelerate")

from tests.integrations import trainer_cases as tc  # noqa: E402

DEVICE = os.environ.get("SEQPAR_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"SEQPAR_TEST_DEVICE={DEVICE} but CUDA is not available", allow_module_level=True)
ON_CUDA = DEVICE.startswith("cuda")
ARGS = {"use_cpu": not ON_CUDA}
# float32: the GPU's SDPA and seqpar's kernels round differently (test_cuda.py's FLOAT32_TOL); bf16: a few roundings
RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _same_losses(got: list[float], ref: list[float], rtol: float) -> None:
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref):
        assert abs(a - b) <= rtol * abs(b), (got, ref)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_process_equals_stock_trainer(tmp_path, dtype):
    from seqpar.integrations.hf import Trainer

    kw = {**ARGS, "bf16": dtype == "bfloat16"}
    ref = tc.stock_run("llama", "packed", 4, str(tmp_path / "stock"), args_kw=kw)
    got = tc.train_and_predict(Trainer, "llama", "packed", 4, str(tmp_path / "sp"), args_kw=kw)
    _same_losses(got["losses"], ref["losses"], RTOL[dtype])


@pytest.mark.skipif(not ON_CUDA, reason="on CPU: tests/integrations/test_trainer.py")
def test_two_ranks_on_one_gpu_equal_stock_trainer(pool, tmp_path):
    ref = tc.stock_run("llama", "padded", 2, str(tmp_path / "stock"), ga=2, args_kw=ARGS)
    got = pool(2).run(tc.seqpar_run, "llama", "padded", 2, str(tmp_path / "sp"), {"sp": 2}, "ulysses", ga=2,
                      args_kw=ARGS, timeout=300)
    _same_losses(got[0]["losses"], ref["losses"], RTOL["float32"])
    assert all(r["logged"] == got[0]["losses"] for r in got)
