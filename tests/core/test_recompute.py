"""seqpar.core.recompute on its own: the offload's asynchronous CUDA path (run on CPU with stand-in
streams), checkpoint and tiled outside autograd, MemoryConfig's refusals."""
from __future__ import annotations

import contextlib

import pytest
import torch

import seqpar
from seqpar.core.recompute import MemoryConfig, Offloader, checkpoint, tiled


class _Recorder:
    """Stand-in CUDA stream API: runs the Offloader's asynchronous path on CPU and records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        test = self

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def wait_stream(self, other) -> None:
                test.calls.append(f"{self.name} waits {other.name}")

            def wait_event(self, event) -> None:
                test.calls.append(f"{self.name} waits {event.name}")

        class Event:
            def __init__(self) -> None:
                self.name = f"event{sum(c.startswith('event') for c in test.calls)}"
                test.calls.append(self.name)

            def record(self, stream) -> None:
                test.calls.append(f"record {self.name} on {stream.name}")

        self.Stream, self.Event = Stream, Event
        self.current = Stream("compute")

    def side_stream(self, device):
        return self.Stream("side")

    def current_stream(self, device):
        return self.current

    def use(self, stream):
        self.calls.append(f"use {stream.name}")
        return contextlib.nullcontext()

    def event(self):
        return self.Event()

    def pinned_empty(self, like):
        self.calls.append("pinned")
        return torch.empty_like(like)

    def record_stream(self, t, stream) -> None:
        self.calls.append(f"record_stream on {stream.name}")


def test_offload_async_path_runs_and_orders_its_copies():
    """The CUDA code path (side stream, pinned buffers, events, prefetch of the previous checkpoint) on CPU."""
    api = _Recorder()
    off = Offloader(streams=api)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    off.new_pass()
    y = checkpoint(lambda t: torch.tanh(lin(t)), x, modules=[lin], offloader=off)
    z = checkpoint(lambda t: torch.tanh(lin(t)), y, modules=[lin], offloader=off)
    put = api.calls[:]
    # each input: into a pinned buffer on the side stream once the compute stream produced it, its memory
    # kept for the side stream
    assert put == [c for i in (0, 1) for c in ("pinned", "side waits compute", "use side", f"event{i}",
                                                f"record event{i} on side", "record_stream on side")]
    assert off.host_bytes == 2 * x.numel() * 8
    z.sum().backward()
    got = [x.grad.clone(), lin.weight.grad.clone()]
    # z's checkpoint comes back once its copy to host is done, the compute stream waits for it, and only
    # then is y's (the one backward needs next) fetched, to arrive while z's layer is replayed
    assert api.calls[len(put):] == [
        "use side", "side waits event1", "event2", "record event2 on side", "compute waits event2",
        "record_stream on compute", "use side", "side waits event0", "event3", "record event3 on side",
        "compute waits event3", "record_stream on compute"]
    assert off.host_bytes == 0
    x.grad, lin.weight.grad, lin.bias.grad = None, None, None
    torch.tanh(lin(torch.tanh(lin(x)))).sum().backward()
    torch.testing.assert_close(got, [x.grad, lin.weight.grad], rtol=0, atol=0)


def test_tiled_and_checkpoint_outside_autograd_and_bad_settings():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 10, 4)
    with torch.no_grad():
        assert torch.equal(tiled(lin, x, 3), lin(x)) and torch.equal(checkpoint(lin, x, modules=[lin]), lin(x))
    with pytest.raises(seqpar.ConfigError, match="offload=True"):
        MemoryConfig(offload=True)
    with pytest.raises(seqpar.ConfigError, match="checkpoint_every=2"):
        MemoryConfig(checkpoint_every=2)
    with pytest.raises(seqpar.ConfigError, match="mlp_tiles=0"):
        MemoryConfig(mlp_tiles=0)
