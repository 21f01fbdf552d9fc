"""Module names that moved, kept importable.

Two kinds:

* ``STABLE``: the short public names of the core modules (``seqpar.comm`` is
  :mod:`seqpar.core.comm`).  They are part of the API, not deprecated: registered
  in ``sys.modules`` when seqpar is imported, so ``import seqpar.comm`` and
  ``from seqpar.comm import all_gather`` give the very module object.
* ``DEPRECATED``: application modules renamed when the package was layered
  (``seqpar.training`` is now :mod:`seqpar.train.loss`).  Importing or touching
  the old name works for one more release and warns with the new name.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

STABLE = {name: f"seqpar.core.{name}" for name in
          ("comm", "kernels", "stats", "layout", "mesh", "errors", "masks", "packing", "debug", "configs",
           "fused_merge")}

DEPRECATED = {
    "seqpar.trainer": "seqpar.train.trainer",
    "seqpar.training": "seqpar.train.loss",
    "seqpar.data": "seqpar.train.data",
    "seqpar.checkpoint": "seqpar.train.checkpoint",
    "seqpar.workers": "seqpar.launch.pool",
    "seqpar.plan.layout": "seqpar.plan.parallel_layout",
    "seqpar.plan.comm": "seqpar.plan.comm_cost",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} was renamed {new}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warn_moved(self.old, self.new, stacklevel=6)
        self._module = importlib.import_module(self.new)
        self._spec = self._module.__spec__
        return self._module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system stamped the alias's spec on the shared module


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in DEPRECATED:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, DEPRECATED[fullname]))
        return None


def install() -> None:
    """Register the stable short names and the finder of the deprecated ones (idempotent)."""
    for short, full in STABLE.items():
        sys.modules.setdefault(f"seqpar.{short}", importlib.import_module(full))
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def deprecated_attribute(name: str):
    """The module a deprecated ``seqpar.<name>`` attribute refers to (with a warning), else AttributeError."""
    old = f"seqpar.{name}"
    if old not in DEPRECATED:
        raise AttributeError(f"module 'seqpar' has no attribute {name!r}")
    warn_moved(old, DEPRECATED[old])
    return importlib.import_module(DEPRECATED[old])
