"""seqpar: sequence parallelism for PyTorch.

Every scheme behind one API, exact against a single-device run::

    mesh = seqpar.init(sp=4)                      # from torchrun's environment
    q, k, v = (seqpar.shard(t, layout="zigzag") for t in (q, k, v))
    out = seqpar.attention(q, k, v, causal=True, strategy="ring", layout="zigzag")
"""
from . import comm, inference, kernels, plan, stats
from .attention import STRATEGIES, attention
from .debug import NumericsError, set_check_finite, set_debug
from .errors import CommError, ConfigError, SeqParError, ShapeError
from .layout import position_ids, shard, unshard
from .mesh import Mesh, get_mesh, init, set_mesh

__version__ = "0.1.0"

__all__ = [
    "init", "Mesh", "get_mesh", "set_mesh", "attention", "STRATEGIES", "shard", "unshard", "position_ids",
    "SeqParError", "ConfigError", "ShapeError", "CommError", "NumericsError", "set_debug", "set_check_finite",
    "comm", "inference", "kernels", "plan", "stats",
]
