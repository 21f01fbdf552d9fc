"""Running one documented block (see :mod:`tests.docs.blocks`) the way a reader would.

Every block of a page runs in that page's working directory, in order: a temporary directory
holding links to the repository's ``examples``, ``benchmarks``, ``docs``, ``src`` and top-level
files, so commands written relative to the repository root work and whatever they write stays
out of the tree.  The environment is the reader's after installing seqpar: ``seqpar``,
``python`` and ``torchrun`` from this interpreter's environment, this tree's sources first.

Two things are never run, because a test must not change the machine it runs on:
``pip install`` (checked instead: the extras it names must exist) and ``make`` targets (their
recipe is read with ``make -n`` and run directly, so ``make demo`` runs what it would run
without reinstalling anything).
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .blocks import ROOT, Block

PARSE_ONLY = Path(__file__).with_name("parse_only.py")
LINKED = ("examples", "benchmarks", "docs", "src", "tests", "Makefile", "pyproject.toml", "README.md",
          "BENCHMARKS.md")
DEFAULT_TIMEOUT = 180.0

# shell functions standing in for the two commands a test must not run for real
_PRELUDE = r"""
pip() {
    if [ "$1" = install ]; then
        "$SEQPAR_DOCS_PYTHON" "$SEQPAR_DOCS_PARSE_ONLY" pip "$@" && echo "(tests: pip install not run)"
    else
        command "$SEQPAR_DOCS_PYTHON" -m pip "$@"
    fi
}
make() {
    local recipe
    recipe=$(command make --no-print-directory -s -n -C "$SEQPAR_DOCS_ROOT" VENV="$SEQPAR_DOCS_VENV" \
        -o "$SEQPAR_DOCS_VENV/.seqpar-installed" "$@") || return
    eval "$recipe"
}
"""


@dataclass
class Result:
    output: str  # stdout (and stderr for shell), or rank 0's stdout for Python on ranks
    returncode: int


class BlockFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(base: Path) -> Path:
    """A fresh working directory with links to the repository's files."""
    base.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (ROOT / name).exists() and not (base / name).exists():
            (base / name).symlink_to(ROOT / name)
    return base


def environment() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]]
                                                                          if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master-port: never collide with another run
    env["PORT"] = str(free_port())  # the port the multi-node recipe's rendezvous uses
    env["SEQPAR_DOCS_PYTHON"] = sys.executable
    env["SEQPAR_DOCS_PARSE_ONLY"] = str(PARSE_ONLY)
    env["SEQPAR_DOCS_ROOT"] = str(ROOT)
    env["SEQPAR_DOCS_VENV"] = sys.prefix
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check(proc: subprocess.CompletedProcess, block: Block, what: str) -> Result:
    out = proc.stdout + (proc.stderr or "")
    if proc.returncode != 0:
        raise BlockFailed(f"{block.id} ({what}) exited with status {proc.returncode}:\n{block.text}\n"
                          f"--- output (last 4000 characters) ---\n{out[-4000:]}")
    return Result(proc.stdout, proc.returncode)


def _run(cmd: list[str], cwd: Path, block: Block, what: str) -> Result:
    timeout = float(block.options.get("timeout", DEFAULT_TIMEOUT))
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise BlockFailed(f"{block.id} ({what}) did not finish in {timeout:.0f} s:\n{block.text}\n"
                          f"--- output so far ---\n{(e.stdout or b'')[-3000:]!r}") from None
    return _check(proc, block, what)


def run_shell(block: Block, cwd: Path) -> Result:
    """The block as one bash script (stop at the first failing command)."""
    script = _PRELUDE + "set -eo pipefail\n" + block.text
    return _run(["bash", "-c", script], cwd, block, "shell")


def command_lines(text: str) -> list[str]:
    """The commands of a shell block, continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


#: programs whose arguments a parse-only check reads (the rest of a shell block is plumbing)
PARSED = ("seqpar", "python", "python3", "torchrun", "pip", "make", "bash")


def _words(line: str) -> list[str]:
    """One command's words, up to the first redirection, pipe or separator (``> out.md``, ``| tee``, ``&&``)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for w in lexer:
        if w and set(w) <= set("<>|&;()"):
            break
        words.append(w)
    return words


def parse_shell(block: Block, cwd: Path) -> Result:
    """Every command of the block parsed by its own program, none run."""
    outputs = []
    for line in command_lines(block.text):
        words = _words(line)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]
        if not words or words[0] not in PARSED:
            continue  # shell utilities (sed, cp, grep...): nothing of seqpar's to check
        if words[0] == "bash":  # a script of the repository: it exists and its syntax is valid
            outputs.append(_run(["bash", "-n", words[1]], cwd, block, "bash -n").output)
            continue
        if words[0] == "make":
            target = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            outputs.append(_run(["make", "-n", "-C", str(ROOT), f"VENV={sys.prefix}", "-o",
                                 f"{sys.prefix}/.seqpar-installed", *target], cwd, block, "make -n").output)
            continue
        outputs.append(_run([sys.executable, str(PARSE_ONLY), *words], cwd, block, "parse only").output)
    return Result("".join(outputs), 0)


def snippet_source(block: Block) -> str:
    from . import setups

    name = block.options.get("setup")
    prefix = ""
    if name:
        if name not in setups.SETUPS:
            raise BlockFailed(f"{block.id}: unknown setup {name!r}; tests/docs/setups.py has {sorted(setups.SETUPS)}")
        prefix = setups.SETUPS[name].strip() + "\n\n"
    return prefix + block.text


def run_python(block: Block, cwd: Path, pool=None) -> Result:
    """A Python snippet: as a script, on the local worker pool (``ranks``), or under torchrun."""
    source = snippet_source(block)
    name = f"_snippet_{Path(block.path).stem}_{block.line}.py"
    (cwd / name).write_text(source)
    if block.options.get("ranks"):
        from seqpar.launch import WorkerError

        from .tasks import run_snippet

        try:
            outs = pool(block.options["ranks"]).run(run_snippet, source, str(cwd / name), str(cwd),
                                                    timeout=float(block.options.get("timeout", DEFAULT_TIMEOUT)))
        except WorkerError as e:
            raise BlockFailed(f"{block.id} (Python on {block.options['ranks']} ranks) failed:\n{block.text}\n"
                              f"--- ranks ---\n{e}") from None
        return Result(outs[0], 0)
    if block.options.get("torchrun"):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(block.options["torchrun"]),
               name]
        return _run(cmd, cwd, block, "torchrun")
    return _run([sys.executable, name], cwd, block, "python")


def parse_python(block: Block, cwd: Path) -> Result:
    name = f"_snippet_{Path(block.path).stem}_{block.line}.py"
    (cwd / name).write_text(snippet_source(block))
    return _run([sys.executable, str(PARSE_ONLY), "--python", name], cwd, block, "compile + imports")


def matches(expected: str, actual: str) -> bool:
    """Output comparison: line by line, trailing spaces ignored; ``...`` in a line matches any text,
    a line that is only ``...`` matches any number of lines."""
    pattern = []
    for line in expected.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:.*\n)*?")
        else:
            pattern.append(".*".join(re.escape(part) for part in line.rstrip().split("...")) + r"[ \t]*\n")
    lines = "".join(line.rstrip() + "\n" for line in actual.rstrip("\n").splitlines())
    return re.fullmatch("".join(pattern), lines) is not None
