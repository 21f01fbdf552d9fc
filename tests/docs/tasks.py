"""Worker-pool task of the documentation tests (module-level: tasks pickle by reference)."""
from __future__ import annotations

import contextlib
import io
import os

import seqpar


def run_snippet(source: str, filename: str, cwd: str) -> str:
    """Run a documented Python snippet on this rank as a script would run, and return what it printed.

    The default mesh and the debug switches are reset afterwards, so the next task starts clean.
    """
    out = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, filename, "exec"), {"__name__": "__main__", "__file__": filename})
    finally:
        os.chdir(here)
        seqpar.set_mesh(None)
        seqpar.set_debug(False)
        seqpar.set_check_finite(False)
    return out.getvalue()
