"""Column- and row-parallel linear layers, with Megatron sequence parallelism (Korthikanti et al. 2022).

A transformer MLP is ``RowParallelLinear(act(ColumnParallelLinear(x)))``: the
column layer splits the *output* features over the t tensor-parallel ranks, the
row layer splits its *input* features the same way, so the activation between
them stays sharded and the pair needs one reduction.

``sequence_parallel=False`` (activations outside the pair replicated over tp)::

    x [B, S, h] --copy (bwd all-reduce)--> x @ W1_r^T [B, S, f/t] --act--> @ W2_r^T --all-reduce--> [B, S, h]

``sequence_parallel=True`` (activations outside the pair are sequence shards)::

    x [B, S/t, h] --all-gather seq (bwd reduce-scatter)--> [B, S, h] -> [B, S, f/t] -> act
      -> [B, S, h] partial --reduce-scatter seq (bwd all-gather)--> [B, S/t, h]

Same bytes as the all-reduce (an all-reduce *is* reduce-scatter + all-gather),
but everything outside the pair (norms, dropout, residual) now runs on S/t
tokens, and the column layer stores only its S/t input shard for backward
(re-gathered there, overlapped with the gradient matmuls).  The row layer's bias is then added on a
sequence shard, so its gradient is partial per tp rank: it is marked ``bias.sequence_parallel = True`` for
:func:`seqpar.tp.sync_sequence_parallel_grads`.

Weights are initialised like ``nn.Linear`` on the *full* ``[out, in]`` matrix and
then sharded, so for a given seed a layer holds the same numbers whatever t is
(Megatron's ``use_cpu_initialization``).  This costs one full weight per rank at
init time; build on ``device="meta"`` to skip it, then ``to_empty()`` and fill the
shards yourself (e.g. from a sharded checkpoint).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, ShapeError, check
from ..core.mesh import Mesh
from . import mappings as mp
from ._base import TPModule, divisible, load_full, set_full, should_init, skip_init
from ._sp_linear import GatherLinear

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _init_linear_full(out_f: int, in_f: int, bias: bool, like: torch.Tensor):
    """The full weight/bias exactly as ``nn.Linear.reset_parameters`` draws them (same generator calls)."""
    w = torch.empty(out_f, in_f, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    b = None
    if bias:
        b = torch.empty(out_f, dtype=like.dtype, device=like.device)
        bound = 1 / math.sqrt(in_f) if in_f > 0 else 0
        nn.init.uniform_(b, -bound, bound)
    return w, b


def _check_in(x: torch.Tensor, n: int, name: str) -> None:
    check(x.dim() >= 1 and x.shape[-1] == n, ShapeError,
          f"{name}: input of shape {tuple(x.shape)} must have {n} features in its last dim")


class ColumnParallelLinear(TPModule):
    """``y = x W^T + b`` with ``W [out, in]`` split by rows: rank r holds ``W[r*out/t:(r+1)*out/t]``.

    Shapes (``seq_dim=1``; ``seq_dim=0`` for ``[S, B, h]``):

    * ``sequence_parallel=False``: ``[B, S, in]`` replicated -> ``[B, S, out/t]``.
      Communication: none forward; all-reduce of the input gradient backward.
    * ``sequence_parallel=True``: ``[B, S/t, in]`` (this rank's sequence shard) -> ``[B, S, out/t]``.
      Communication: all-gather of the input along seq forward; backward all-gathers it again (only
      the shard is stored, as in the paper) and reduce-scatters its gradient, both overlapped with
      the gradient matmuls.
    * ``gather_output=True`` (not with sequence_parallel): output all-gathered to ``[B, S, out]``
      replicated; backward keeps this rank's chunk of the gradient.

    The bias is sharded with the output features.  Parameters carry ``tensor_parallel=True`` and
    ``partition_dim`` (0 for weight and bias).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mesh: Mesh | None = None,
                 sequence_parallel: bool = False, gather_output: bool = False, seq_dim: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(mesh)
        check(not (gather_output and sequence_parallel), ConfigError,
              "ColumnParallelLinear: gather_output=True and sequence_parallel=True do not combine (the output "
              "would be the whole sequence, replicated); keep the output sharded, or turn sequence_parallel off")
        divisible(in_features, 1, "in_features", "")
        self.out_per_rank = divisible(
            out_features, self.tp_size, "ColumnParallelLinear out_features",
            f"choose out_features as a multiple of {self.tp_size} (or pad it) or use a smaller tp")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.gather_output, self.seq_dim = sequence_parallel, gather_output, seq_dim
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_per_rank, **kw)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.tensor_parallel, p.partition_dim = True, 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init of the full matrix, sharded (identical on every tp rank for one seed)."""
        if not should_init(self.weight):
            return
        w, b = _init_linear_full(self.out_features, self.in_features, self.bias is not None, self.weight)
        load_full(self.weight, w, self.tp_size, self.tp_rank, 0)
        if b is not None:
            load_full(self.bias, b, self.tp_size, self.tp_rank, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_in(x, self.in_features, "ColumnParallelLinear")
        if self.sequence_parallel and self.tp_size > 1:
            # each rank holds S/t tokens and the matmul needs all S of them; only the shard is saved
            y = GatherLinear.apply(x, self.weight, self.bias, self.seq_dim % x.dim(), self.tp_group)
        else:
            y = F.linear(mp.copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)
        return mp.gather_from_tensor_parallel_region(y, self.tp_group) if self.gather_output else y

    @classmethod
    def from_full(cls, linear: nn.Linear, *, mesh: Mesh | None = None, sequence_parallel: bool = False,
                  gather_output: bool = False, seq_dim: int = 1) -> ColumnParallelLinear:
        """This rank's shard of a single-device ``nn.Linear`` (no communication, no RNG use)."""
        w = linear.weight
        with skip_init():
            layer = cls(w.shape[1], w.shape[0], linear.bias is not None, mesh=mesh, sequence_parallel=sequence_parallel,
                        gather_output=gather_output, seq_dim=seq_dim, dtype=w.dtype, device=w.device)
        load_full(layer.weight, w, layer.tp_size, layer.tp_rank, 0)
        if linear.bias is not None:
            load_full(layer.bias, linear.bias, layer.tp_size, layer.tp_rank, 0)
        return layer

    def to_full(self, *, grad: bool = False) -> nn.Linear:
        """The equivalent single-device ``nn.Linear`` (all-gather of the shards over tp; every tp rank must call).

        ``grad=True`` also gathers ``.grad`` into the result's ``.grad``.
        """
        w, gw = self._gather_param(self.weight, 0, grad)
        b, gb = self._gather_param(self.bias, 0, grad)
        return _full_linear(w, b, gw, gb)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} ({self.out_per_rank} per rank, "
                f"tp={self.tp_size}), bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(TPModule):
    """``y = x W^T + b`` with ``W [out, in]`` split by columns: rank r holds ``W[:, r*in/t:(r+1)*in/t]``.

    Shapes (``seq_dim=1``):

    * ``input_is_parallel=True`` (the default; the output of a ColumnParallelLinear): ``[B, S, in/t]``.
      ``input_is_parallel=False``: ``[B, S, in]`` replicated, split here (backward all-gathers its gradient).
    * ``sequence_parallel=False``: output ``[B, S, out]`` replicated.
      Communication: all-reduce forward; none backward.
    * ``sequence_parallel=True``: output ``[B, S/t, out]``, this rank's sequence shard (S divisible by t).
      Communication: reduce-scatter along seq forward; all-gather of the gradient backward.

    The bias is replicated and added *after* the reduction (once, not t times); with
    sequence_parallel it is marked ``bias.sequence_parallel = True``: call
    :func:`seqpar.tp.sync_sequence_parallel_grads` after backward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mesh: Mesh | None = None,
                 sequence_parallel: bool = False, input_is_parallel: bool = True, seq_dim: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(mesh)
        check(input_is_parallel or not sequence_parallel, ConfigError,
              "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (the input must be the "
              "feature-sharded output of a ColumnParallelLinear)")
        divisible(out_features, 1, "out_features", "")
        self.in_per_rank = divisible(
            in_features, self.tp_size, "RowParallelLinear in_features",
            f"choose in_features as a multiple of {self.tp_size} (or pad it) or use a smaller tp")
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.input_is_parallel, self.seq_dim = sequence_parallel, input_is_parallel, seq_dim
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw))
        self.weight.tensor_parallel, self.weight.partition_dim = True, 1
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if self.bias is not None:
            # added on a sequence shard: each tp rank sees a different part of the gradient
            self.bias.sequence_parallel = sequence_parallel
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init of the full matrix, sharded; the replicated bias is the same on every rank."""
        if not should_init(self.weight):
            return
        w, b = _init_linear_full(self.out_features, self.in_features, self.bias is not None, self.weight)
        load_full(self.weight, w, self.tp_size, self.tp_rank, 1)
        if b is not None:
            load_full(self.bias, b, self.tp_size, self.tp_rank, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            _check_in(x, self.in_per_rank, "RowParallelLinear (input_is_parallel=True)")
        else:
            _check_in(x, self.in_features, "RowParallelLinear (input_is_parallel=False)")
        if self.sequence_parallel and self.tp_size > 1:
            # fail on every rank before the matmul and the collective, not inside reduce_scatter
            mp.check_seq_divisible(x, self.seq_dim, self.tp_size, "RowParallelLinear")
        if not self.input_is_parallel:
            x = mp.scatter_to_tensor_parallel_region(x, self.tp_group)
        y = F.linear(x, self.weight)  # partial sum over this rank's input features
        if self.sequence_parallel:
            y = mp.reduce_scatter_to_sequence_parallel_region(y, self.tp_group, self.seq_dim)
        else:
            y = mp.reduce_from_tensor_parallel_region(y, self.tp_group)
        # the bias is added after the reduction (once, not once per rank); in y's dtype, as nn.Linear does
        # under autocast (a float32 bias would otherwise promote a bf16 output)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_full(cls, linear: nn.Linear, *, mesh: Mesh | None = None, sequence_parallel: bool = False,
                  input_is_parallel: bool = True, seq_dim: int = 1) -> RowParallelLinear:
        """This rank's shard of a single-device ``nn.Linear`` (no communication, no RNG use)."""
        w = linear.weight
        with skip_init():
            layer = cls(w.shape[1], w.shape[0], linear.bias is not None, mesh=mesh, sequence_parallel=sequence_parallel,
                        input_is_parallel=input_is_parallel, seq_dim=seq_dim, dtype=w.dtype, device=w.device)
        load_full(layer.weight, w, layer.tp_size, layer.tp_rank, 1)
        if linear.bias is not None:
            load_full(layer.bias, linear.bias, layer.tp_size, layer.tp_rank, None)
        return layer

    def to_full(self, *, grad: bool = False) -> nn.Linear:
        """The equivalent single-device ``nn.Linear`` (all-gather of the weight columns; every tp rank must call).

        The bias is this rank's copy; with sequence_parallel its ``.grad`` is only whole after
        :func:`seqpar.tp.sync_sequence_parallel_grads`.
        """
        w, gw = self._gather_param(self.weight, 1, grad)
        b, gb = self._gather_param(self.bias, None, grad)
        return _full_linear(w, b, gw, gb)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} per rank, tp={self.tp_size}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}, input_is_parallel={self.input_is_parallel}")


def _full_linear(w: torch.Tensor, b: torch.Tensor | None, gw: torch.Tensor | None,
                 gb: torch.Tensor | None) -> nn.Linear:
    lin = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
    set_full(lin.weight, w, gw)
    if b is not None:
        set_full(lin.bias, b, gb)
    return lin
