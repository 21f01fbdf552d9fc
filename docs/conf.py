"""Sphinx configuration of seqpar's documentation (``make docs``; CI builds it with warnings as errors).

Pages are MyST Markdown.  What is generated from the code, never copied by hand: the API reference
(autodoc), the command line (sphinx-argparse), the training-config keys (``seqpar_docs``, from
:class:`seqpar.train.TrainConfig`) and the figures (``docs/figures/plot.py`` from the benchmarks'
JSON, ``seqpar plan --plot`` for the planner's).
"""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))  # this tree's seqpar, installed or not
sys.path.insert(0, str(DOCS / "_ext"))

import seqpar  # noqa: E402

project = "seqpar"
author = "the seqpar authors"
copyright = "2026, the seqpar authors"
release = version = seqpar.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "sphinxcontrib.mermaid",
    "seqpar_docs",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated", "figures/data", "Thumbs.db", ".DS_Store"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked like any other
myst_fence_as_directive = ["mermaid"]  # ```mermaid renders here and on GitHub alike

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# a short name that two documented classes share (SeqInfo.seq_len, KVCache.seq_len) makes the Python
# domain warn about ambiguity even for references it then resolves by context
suppress_warnings = ["ref.python"]

html_theme = "furo"
html_title = f"seqpar {release}"
html_static_path = ["_static"]
mermaid_version = "11.4.1"
