"""Memory beyond attention: activation recomputation, host offload of checkpoints, tiled token-wise blocks.

Substrate, no model in sight (the reference model and the Hugging Face integration both use it).
Three autograd pieces, each exact (backward replays the same forward, no RNG drawn differently):

* :func:`checkpoint` ``(fn, *inputs)``: runs ``fn`` without keeping its intermediates and replays it
  in backward (reentrant activation checkpointing).  With an :class:`Offloader` the saved inputs go
  to host memory right after the forward and come back, prefetched one checkpoint ahead, in backward.
* :func:`tiled` ``(fn, x, tiles)``: a token-wise ``fn`` (an MLP, a norm) over sequence tiles: only one
  tile's intermediates exist at a time, forward and backward (ALST's tiled MLP).
* :class:`MemoryConfig`: what :class:`seqpar.models.LlamaForCausalLM` and
  :func:`seqpar.integrations.hf_memory.apply_memory` run; the planner models the same settings
  (``recompute``, ``offload``, ``mlp_tiles``, ``checkpoint_every``).

``recompute`` keeps the planner's meaning: ``"none"`` stores every activation; ``"selective"``
recomputes what is cheap in FLOPs and large in memory, never a matmul: the RMSNorms, the SwiGLU
product and, where attention materialises its scores (``ring_qk_av``), the attention core
(Korthikanti et al. 2022's selective recomputation); ``"full"`` keeps only each layer's input
(every ``checkpoint_every``-th layer's with chains of layers) and replays the layer in backward,
selectively (so the replayed layer holds what ``"selective"`` keeps, not all of its activations).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, check

__all__ = ["RECOMPUTE_MODES", "MemoryConfig", "Offloader", "CudaStreams", "checkpoint", "tiled"]

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class MemoryConfig:
    """Memory settings of a model (all off by default; every one leaves the results unchanged).

    Attributes:
        recompute: ``"none"``, ``"selective"`` or ``"full"`` (see the module docstring).
        offload: with ``recompute="full"``, keep the checkpointed layer inputs in host memory.
        mlp_tiles: run each layer's MLP block (its norm and the MLP) over this many sequence tiles
            (1: not tiled).
        checkpoint_every: with ``recompute="full"``, checkpoint every k-th layer's input and replay
            chains of k layers (k times fewer checkpoints, k layers' activations alive in backward).
    """

    recompute: str = "none"
    offload: bool = False
    mlp_tiles: int = 1
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        check(self.recompute in RECOMPUTE_MODES, ConfigError,
              f"recompute={self.recompute!r}: use one of {', '.join(map(repr, RECOMPUTE_MODES))}")
        check(isinstance(self.offload, bool), ConfigError, f"offload={self.offload!r}: use true or false")
        check(not self.offload or self.recompute == "full", ConfigError,
              f"offload=True moves the checkpointed layer inputs to host memory, which only recompute='full' "
              f"keeps; got recompute={self.recompute!r}: set recompute='full' or offload=False")
        for name in ("mlp_tiles", "checkpoint_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, ConfigError,
                  f"{name}={v!r}: use a positive int (1 = off)")
        check(self.checkpoint_every == 1 or self.recompute == "full", ConfigError,
              f"checkpoint_every={self.checkpoint_every} chains layers between checkpoints, which only "
              f"recompute='full' does; got recompute={self.recompute!r}")


# --------------------------------------------------------------------------- offload


class _Entry:
    """One offloaded tensor: its host copy, the copy's completion, and the checkpoint saved before it."""

    __slots__ = ("host", "copied", "device", "device_copy", "fetched", "prev", "nbytes")

    def __init__(self, host: torch.Tensor, copied: Any, device: torch.device, prev: _Entry | None):
        self.host: torch.Tensor | None = host
        self.copied, self.device, self.prev = copied, device, prev
        self.device_copy: torch.Tensor | None = None
        self.fetched: Any = None
        self.nbytes = host.numel() * host.element_size()


class CudaStreams:
    """The device operations :class:`Offloader` needs on CUDA (a stand-in can run the same path elsewhere)."""

    def side_stream(self, device: torch.device):
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self):
        return torch.cuda.Event()

    def pinned_empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class Offloader:
    """Host copies of checkpointed activations, fetched back (one ahead) in backward.

    On CUDA, :meth:`put` copies on a side stream into pinned host memory (the compute stream does
    not wait; the device tensor's memory is not reused before the copy ends, ``record_stream``), and
    :meth:`get` waits for that checkpoint's copy back and starts the next one backward needs (the
    checkpoint saved just before it), so its transfer overlaps the replay of this one.  Elsewhere
    (CPU) the same calls run with synchronous copies: the code path and the results are the same.
    ``streams`` replaces :class:`CudaStreams` (tests run the asynchronous path on CPU with it).

    Attributes ``host_bytes`` / ``peak_host_bytes``: bytes held in host memory now / at most.
    """

    def __init__(self, streams=None) -> None:
        self._last: _Entry | None = None
        self._stream = None
        self._api = streams
        self.host_bytes = 0
        self.peak_host_bytes = 0

    def new_pass(self) -> None:
        """Start a forward pass: the next checkpoint has none before it to prefetch."""
        self._last = None

    def _streams(self, device: torch.device):
        """The stream API for ``device``: asynchronous copies on CUDA (or with a given API), else None."""
        if self._api is None and device.type == "cuda":
            self._api = CudaStreams()
        return self._api

    def _side_stream(self, api, device: torch.device):
        if self._stream is None:
            self._stream = api.side_stream(device)
        return self._stream

    def put(self, x: torch.Tensor) -> _Entry:
        """Start copying ``x`` to host memory; the caller may drop ``x`` right away."""
        x = x.detach()
        api = self._streams(x.device)
        if api is not None:
            stream = self._side_stream(api, x.device)
            host = api.pinned_empty(x)
            stream.wait_stream(api.current_stream(x.device))  # x is complete on the compute stream
            with api.use(stream):
                host.copy_(x, non_blocking=True)
                copied = api.event()
                copied.record(stream)
            api.record_stream(x, stream)  # the allocator keeps x's memory until the side stream is done with it
        else:
            host, copied = x.to("cpu", copy=True), None
        entry = _Entry(host, copied, x.device, self._last)
        self._last = entry
        self.host_bytes += entry.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return entry

    def _fetch(self, entry: _Entry | None) -> None:
        """Start copying ``entry`` back to its device (no-op if already under way or consumed)."""
        if entry is None or entry.device_copy is not None or entry.host is None:
            return
        api = self._streams(entry.device)
        if api is not None:
            stream = self._side_stream(api, entry.device)
            with api.use(stream):
                if entry.copied is not None:
                    stream.wait_event(entry.copied)
                entry.device_copy = entry.host.to(entry.device, non_blocking=True)
                fetched = entry.fetched = api.event()
                fetched.record(stream)
        else:
            entry.device_copy = entry.host.to(entry.device)

    def get(self, entry: _Entry) -> torch.Tensor:
        """The tensor ``entry`` holds, on its device; prefetches the checkpoint saved before it."""
        check(entry.host is not None, ConfigError,
              "an offloaded checkpoint was used twice: backward through a checkpointed layer runs once "
              "(retain_graph=True is not supported with offload)")
        self._fetch(entry)
        out = entry.device_copy
        if out is None:  # _fetch always leaves a copy for an entry still holding its host tensor
            raise ConfigError("an offloaded checkpoint could not be fetched back to its device")
        if entry.fetched is not None:
            api = self._streams(entry.device)
            current = api.current_stream(entry.device)
            current.wait_event(entry.fetched)
            api.record_stream(out, current)
        entry.device_copy, entry.host = None, None
        self.host_bytes -= entry.nbytes
        self._fetch(entry.prev)
        return out


# --------------------------------------------------------------------------- checkpoint


@contextlib.contextmanager
def _rng_replay(state: tuple) -> Iterator[None]:
    """Run the block with the RNG state the forward saw (dropout draws the same masks), then restore."""
    cpu, dev, dev_state = state
    devices = [dev] if dev_state is not None else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.set_rng_state(cpu)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, dev)
        yield


def _rng_state(tensors: Sequence[torch.Tensor]) -> tuple:
    dev = next((t.device for t in tensors if t.device.type == "cuda"), None)
    return torch.get_rng_state(), dev, None if dev is None else torch.cuda.get_rng_state(dev)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class _Checkpoint(torch.autograd.Function):
    """``fn(*inputs)`` without saving its intermediates; backward replays it with grad and backpropagates.

    A grad-requiring empty tensor follows the inputs when ``fn``'s parameters need gradients, only so
    that the output requires grad; the parameters' gradients accumulate during the replay's own
    backward (sharded FSDP parameters included: ``fn`` runs their modules' hooks again).
    """

    @staticmethod
    def forward(ctx, fn: Callable, offloader: Offloader | None, n_inputs: int, *args):
        inputs = args[:n_inputs]
        ctx.fn, ctx.n_inputs, ctx.n_args = fn, n_inputs, len(args)
        ctx.rng = _rng_state(inputs)
        ctx.requires = [t.requires_grad for t in inputs]
        if offloader is not None:
            ctx.entries = [offloader.put(t) for t in inputs]
            ctx.offloader = offloader
        else:
            ctx.save_for_backward(*inputs)
            ctx.offloader = None
        with torch.no_grad():
            out = fn(*inputs)
        return out

    @staticmethod
    def backward(ctx, *grads):
        if ctx.offloader is not None:
            saved = [ctx.offloader.get(e) for e in ctx.entries]
            del ctx.entries
        else:
            saved = list(ctx.saved_tensors)
        inputs = [t.detach().requires_grad_(r) for t, r in zip(saved, ctx.requires)]
        with torch.enable_grad(), _rng_replay(ctx.rng):
            outs = _as_tuple(ctx.fn(*inputs))
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        in_grads = tuple(t.grad if r else None for t, r in zip(inputs, ctx.requires))
        return (None, None, None, *in_grads, *([None] * (ctx.n_args - ctx.n_inputs)))


def _needs_grad(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[a grad-requiring empty tensor]`` if a parameter of ``modules`` requires grad, else ``[]``."""
    if any(p.requires_grad for m in modules for p in m.parameters()):
        return [torch.empty(0, requires_grad=True)]
    return []


def checkpoint(fn: Callable, *inputs: torch.Tensor, modules: Sequence[nn.Module] = (),
               offloader: Offloader | None = None):
    """``fn(*inputs)``, keeping only ``inputs`` for backward, which replays ``fn`` (activation checkpointing).

    Args:
        fn: deterministic apart from the RNG (whose state is replayed); may communicate (every rank
            replays the same collectives in backward).
        inputs: the tensors ``fn`` takes; everything else it needs it reads from its closure.
        modules: the modules whose parameters ``fn`` uses (so the output requires grad whenever they do).
        offloader: keep ``inputs`` in host memory instead (see :class:`Offloader`).

    Outside autograd (no grad mode, or nothing requiring grad) this is just ``fn(*inputs)``.
    Returns what ``fn`` returns (a tensor or a tuple of tensors).  Costs one more forward of ``fn``
    in backward; no communication of its own.
    """
    params = _needs_grad(modules)
    if not torch.is_grad_enabled() or not (params or any(t.requires_grad for t in inputs)):
        return fn(*inputs)
    return _Checkpoint.apply(fn, offloader, len(inputs), *inputs, *params)


# --------------------------------------------------------------------------- tiles


class _Tiled(torch.autograd.Function):
    """A token-wise ``fn`` over tiles of dim ``dim``: saves the input only, one tile's intermediates at a time."""

    @staticmethod
    def forward(ctx, fn: Callable, tiles: int, dim: int, x: torch.Tensor, *params):
        ctx.fn, ctx.tiles, ctx.dim, ctx.n_params = fn, tiles, dim, len(params)
        ctx.rng = _rng_state([x])
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            start = 0
            for piece in x.chunk(tiles, dim):
                y = fn(piece)
                check(y.shape[dim] == piece.shape[dim], ConfigError,
                      f"tiled: the function must be token-wise (dim {dim} in = out), got {tuple(piece.shape)} -> "
                      f"{tuple(y.shape)}")
                if out is None:
                    out = y.new_empty(y.shape[:dim] + (x.shape[dim],) + y.shape[dim + 1:])
                out.narrow(dim, start, y.shape[dim]).copy_(y)
                start += y.shape[dim]
                del y
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        start = 0
        with _rng_replay(ctx.rng):
            for piece, g in zip(x.chunk(ctx.tiles, ctx.dim), grad.chunk(ctx.tiles, ctx.dim)):
                xt = piece.detach().requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    y = ctx.fn(xt)
                if y.requires_grad:
                    torch.autograd.backward(y, g)
                if grad_x is not None:
                    grad_x.narrow(ctx.dim, start, piece.shape[ctx.dim]).copy_(xt.grad)
                start += piece.shape[ctx.dim]
                del y, xt
        return (None, None, None, grad_x, *([None] * ctx.n_params))


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int, *, dim: int = 1,
          modules: Sequence[nn.Module] = ()) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn`` (an MLP block), computed over ``tiles`` slices of dim ``dim``.

    Only one tile's intermediates (e.g. the ``[B, S/tiles, ffn]`` SwiGLU activations) exist at a time:
    in forward (no grad kept) and in backward, which replays ``fn`` tile by tile from the saved ``x``.
    Every rank of a tensor-parallel group must use the same ``tiles`` (each tile's collectives pair
    up across ranks).  Returns ``[.., S, ..]`` like ``fn(x)``; ``tiles=1`` (or outside autograd with
    one tile) is plain ``fn(x)``.  Exact: each token's arithmetic is unchanged; weight gradients are
    sums over tiles.  Costs one more forward of ``fn`` in backward; no communication of its own.
    """
    check(isinstance(tiles, int) and tiles >= 1, ConfigError, f"tiles={tiles!r}: use a positive int")
    if tiles == 1:
        return fn(x)
    params = _needs_grad(modules)
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        with torch.no_grad():
            return _Tiled.forward(_NoCtx(), fn, tiles, dim % x.dim(), x)
    return _Tiled.apply(fn, tiles, dim % x.dim(), x, *params)


class _NoCtx:
    """A stand-in ctx for running :class:`_Tiled`'s forward outside autograd (inference: tiles still bound memory)."""

    def save_for_backward(self, *tensors) -> None:
        pass
