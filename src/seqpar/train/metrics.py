"""Where a training run's metrics go: a JSON-lines file in the run directory, and TensorBoard events.

:class:`MetricsWriter` is written by global rank 0 only (the metrics it receives are already
reduced over the ranks).  ``metrics.jsonl`` holds one JSON object per step (``step``, ``loss``,
``lr``, ``tokens_per_s``, ``elapsed_s``, and ``peak_mem_mb`` on logging steps); TensorBoard
events go beside it when the ``tensorboard`` package is installed (``torch.utils.tensorboard``
needs it), as ``train/<name>`` scalars.  A resumed run first drops the lines of steps after the
checkpoint it resumed from (a crashed run wrote them; they are about to be redone), so the file
always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(directory: str | Path) -> list[dict]:
    """Every record of ``directory/metrics.jsonl`` (an empty list when there is none)."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Append step records to ``directory/metrics.jsonl`` and, if available, TensorBoard events.

    Args:
        directory: the run directory (created if missing).
        start_step: the step the run resumes from; records of later steps are dropped first.
        tensorboard: write TensorBoard events when ``tensorboard`` is installed (default); False: never.
    """

    def __init__(self, directory: str | Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / METRICS_FILE
        kept = [r for r in read_metrics(self.directory) if r.get("step", 0) <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tensorboard: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package: JSON lines only
                pass
            else:
                self.tensorboard = SummaryWriter(log_dir=str(self.directory), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        """One step's record: ``{"step": int, name: number, ...}`` (lists are written as their maximum)."""
        clean = {k: (max(v) if isinstance(v, (list, tuple)) and v else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.tensorboard is not None:
            for name, value in clean.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{name}", value, clean["step"])

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
