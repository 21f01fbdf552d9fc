"""What long commands show while they work, and how they end on bad input.

:class:`Progress` draws a live bar (``rich``) on a terminal: step, loss, tokens/s, peak memory and
time left.  When the output is not a terminal (a pipe, a file, a job log), under CI (``CI=true``) or
with ``TERM=dumb``, it prints plain log lines instead, one per logging step, which read well in a
file.  :func:`fail` prints a bad-input error as one line (no traceback) and gives the exit status.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "is_live", "fail", "describe", "mesh_rank", "peak_mem_mb"]


def is_live(stream: TextIO | None = None) -> bool:
    """A live bar suits ``stream``: a terminal, not under CI, not a dumb terminal."""
    stream = stream if stream is not None else sys.stdout
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _rate(per_s: float) -> str:
    return f"{per_s / 1e3:.1f}k" if per_s >= 1e3 else f"{per_s:.0f}"


def describe(info: dict) -> str:
    """``loss 2.3101  12.3k tok/s  peak mem 120 MB`` from a step record (the fields it has)."""
    parts = [str(info["what"])] if info.get("what") else []
    if info.get("loss") is not None:
        parts.append(f"loss {info['loss']:.4f}")
    if info.get("tokens_per_s") is not None:
        parts.append(f"{_rate(info['tokens_per_s'])} tok/s")
    mem = info.get("peak_mem_mb")
    if mem is not None:
        mem = max(mem) if isinstance(mem, (list, tuple)) else mem
        parts.append(f"peak mem {mem:.0f} MB" + ("/rank" if isinstance(info.get("peak_mem_mb"), list) else ""))
    return "  ".join(parts)


class Progress:
    """Progress of ``total`` units of work named ``name``: a live bar on a terminal, else log lines.

    ``step(info)`` after each unit (``info["step"]`` units done, and any of ``loss``, ``tokens_per_s``,
    ``peak_mem_mb``) moves the bar; ``line(info)`` at logging points prints a log line when not live
    (live: it refreshes the figures only); ``note(text)`` prints a message either way (above the bar).
    """

    def __init__(self, total: int, name: str, *, unit: str = "step", stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.total, self.name, self.unit = total, name, unit
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_live(self.stream) if live is None else live
        self._start: int | None = None  # units done when the first update came (a resumed run)
        self._t0 = time.perf_counter()
        self._figures: dict[str, Any] = {}
        self._bar: Any = None
        if self.live:
            try:
                self._open_bar()
            except ImportError:  # rich is a dependency; a stripped install still gets log lines
                self.live = False

    def _open_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=self.stream, force_terminal=True)
        self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TextColumn("left"),
                                 TimeRemainingColumn(), console=console, transient=False, refresh_per_second=4)
        self._bar.start()
        self._task = self._bar.add_task(self.name, total=self.total, figures="")

    def _seen(self, done: int) -> None:
        if self._start is None:
            self._start = max(0, done - 1)
            self._t0 = time.perf_counter()
            if self._bar is not None:
                self._bar.update(self._task, completed=self._start)
                self._bar.reset(self._task, total=self.total, completed=self._start, figures="")

    def step(self, info: dict) -> None:
        """One more unit done (``info["step"]`` in all)."""
        done = int(info["step"])
        self._seen(done)
        self._figures.update({k: v for k, v in info.items() if k in ("what", "loss", "tokens_per_s", "peak_mem_mb")})
        if self._bar is not None:
            self._bar.update(self._task, completed=done, figures=describe(self._figures))

    def line(self, info: dict) -> None:
        """A logging point: a plain line when not live (with time left), fresher figures when live."""
        self.step(info)
        if self.live:
            return
        done = int(info["step"])
        start = self._start or 0
        spent = time.perf_counter() - self._t0
        left = spent / max(1, done - start) * (self.total - done) if done > start else 0.0
        self.stream.write(f"{self.name} {self.unit} {done}/{self.total}  {describe(self._figures)}  "
                          f"elapsed {_clock(spent)}  left {_clock(left)}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message, printed above the bar when live."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fail(command: str, error: BaseException | str, *, quiet: bool = False, rank: int | None = None) -> int:
    """Print ``seqpar COMMAND: error: MESSAGE`` on stderr (one line per line of the message, no traceback)
    unless ``quiet``; returns 2, the exit status of bad input."""
    if not quiet:
        where = f" (rank {rank})" if rank is not None else ""
        print(f"seqpar {command}: error{where}: {error}", file=sys.stderr, flush=True)
    return 2


def mesh_rank() -> int:
    """This process's global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def peak_mem_mb(device_type: str = "cpu") -> float:
    """Peak memory of this process in MiB: CUDA's peak allocation on a GPU, else the peak resident set."""
    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
