"""seqpar: sequence parallelism for PyTorch.

Every scheme behind one API, exact against a single-device run::

    mesh = seqpar.init(sp=4)                      # from torchrun's environment
    q, k, v = (seqpar.shard(t, layout="zigzag") for t in (q, k, v))
    out = seqpar.attention(q, k, v, causal=True, strategy="ring", layout="zigzag")

The package is layered (each layer imports only the ones below it): ``core`` (mesh,
collectives, kernels, masks, layouts), ``attention``, ``tp``, ``models``, ``train``,
``inference``, ``integrations``, ``plan``, ``cli``, and ``launch`` (local and torchrun
ranks).  ``docs/architecture.md`` draws it.
"""
from . import _compat
from .core import comm, configs, debug, errors, kernels, layout, masks, mesh, packing, stats

_compat.install()

from . import inference, plan  # noqa: E402  (after the short core names are registered)
from .attention import STRATEGIES, attention  # noqa: E402
from .core.debug import NumericsError, set_check_finite, set_debug  # noqa: E402
from .core.errors import CommError, ConfigError, SeqParError, ShapeError  # noqa: E402
from .core.layout import position_ids, shard, unshard  # noqa: E402
from .core.mesh import Mesh, get_mesh, init, set_mesh  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "init", "Mesh", "get_mesh", "set_mesh", "attention", "STRATEGIES", "shard", "unshard", "position_ids",
    "SeqParError", "ConfigError", "ShapeError", "CommError", "NumericsError", "set_debug", "set_check_finite",
    "comm", "inference", "kernels", "plan", "stats", "configs", "debug", "errors", "layout", "masks", "mesh",
    "packing",
]


def __getattr__(name: str):
    return _compat.deprecated_attribute(name)
