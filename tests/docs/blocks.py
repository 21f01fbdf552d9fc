"""The commands and code blocks of README.md, docs/ and ``seqpar <command> --help``, as written.

Pure text processing (no torch): :func:`collect` returns every :class:`Block` the tests run.

What is extracted:

* fenced code blocks of ``README.md`` and ``docs/**/*.md`` (shell: ``bash``, ``sh``, ``shell``,
  ``console``; ``python``; data files: ``toml``, ``yaml``, ``json``, ``text``);
* inline code spans of those files that are commands (they start with ``seqpar``, ``torchrun``,
  ``python``, ``make``, ``pip`` or ``bash`` and have arguments: ``seqpar plan`` alone names the
  subcommand in prose, ``seqpar plan llama3-8b --seq-len 8k`` is an example);
* the ``examples:`` lines of every subcommand's ``--help`` epilog.

How a block runs is said by a marker, an HTML comment just before it (on the line before the
fence, or right before an inline span), invisible on GitHub and in the built site::

    <!-- test: ranks=4 setup=tiny_model -->
    ```python
    ...
    ```

Marker keys (:data:`KEYS`): ``ranks=N`` (Python on N local ranks, the worker pool),
``torchrun=N`` (Python saved to a file and launched by ``torchrun --nproc-per-node N``),
``setup=NAME`` (Python run first, from ``tests/docs/setups.py``), ``file=NAME`` (write the block
to NAME in the page's working directory; a later block uses it), ``output`` (the expected output of
the block before it), ``gpu`` (needs CUDA and as many GPUs as its ``--nproc-per-node``: elsewhere
only its arguments are parsed), ``parse`` (only
parse the arguments, or for Python compile it and run its imports; give ``reason=``), ``skip``
(never run; give ``reason=``), ``timeout=S``, ``reason="..."``.  An epilog line that ends with a
comment naming GPUs (``# on GPUs``) is marked ``gpu``.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SHELL = ("bash", "sh", "shell", "console")
PYTHON = ("python", "py")
DATA = ("toml", "yaml", "yml", "json", "text", "txt", "")
#: diagrams and directives are not code: never run
NOT_CODE = ("mermaid", "{mermaid}", "{toctree}", "{eval-rst}", "{contents}", "{argparse}", "{seqpar-config-keys}",
            "{seqpar-figure}", "{include}", "{note}", "{warning}", "{tip}", "{important}", "{admonition}",
            "{automodule}", "{autofunction}", "{autoclass}", "{autosummary}", "{image}", "{figure}")
COMMAND_WORDS = ("seqpar", "torchrun", "python", "make", "pip", "bash")
KEYS = {"ranks": int, "torchrun": int, "setup": str, "file": str, "output": bool, "gpu": bool, "parse": bool,
        "skip": bool, "timeout": float, "reason": str}

_MARKER = re.compile(r"<!--\s*test:(.*?)-->", re.S)
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)\s*(.*)$")
_INLINE = re.compile(r"(?:<!--\s*test:(?P<marker>[^>]*?)-->\s*)?`(?P<code>[^`]+?)`")


class MarkerError(ValueError):
    """A marker that does not parse: the tests report it instead of guessing."""


@dataclass
class Block:
    """One thing to run: where it is written, what it is, and its marker's options."""

    path: str          # relative to the repository root
    line: int          # 1-based line of the fence (or of the inline span / epilog line)
    lang: str          # "shell", "python" or the data language ("toml", "text"...)
    text: str
    kind: str = "fenced"  # "fenced", "inline" or "help"
    options: dict = field(default_factory=dict)
    col: int = 0          # inline spans: 1-based column, so that two on one line have distinct ids

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}" + (f":{self.col}" if self.col else "")

    @property
    def page(self) -> str:
        """Blocks of one page share a working directory and run in order."""
        return self.path


def parse_marker(text: str) -> dict:
    """``"ranks=4 setup=x reason='a b'"`` -> ``{"ranks": 4, "setup": "x", "reason": "a b"}``."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise MarkerError(f"marker {text!r}: {e}") from None
    out: dict = {}
    for w in words:
        key, eq, value = w.partition("=")
        if key not in KEYS:
            raise MarkerError(f"unknown marker key {key!r} in {text!r}: known keys are {sorted(KEYS)}")
        kind = KEYS[key]
        if kind is bool:
            if eq:
                raise MarkerError(f"marker key {key!r} takes no value (in {text!r})")
            out[key] = True
            continue
        if not eq or not value:
            raise MarkerError(f"marker key {key!r} needs a value, e.g. {key}=... (in {text!r})")
        try:
            out[key] = kind(value)
        except ValueError:
            raise MarkerError(f"marker {key}={value!r} is not a {kind.__name__}") from None
    if (out.get("skip") or out.get("parse")) and not out.get("reason"):
        raise MarkerError(f"marker {text!r}: skip and parse need reason=\"why\"")
    return out


def _lang(info: str) -> str:
    word = info.strip().lower()
    if word in SHELL:
        return "shell"
    if word in PYTHON:
        return "python"
    return word


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the marker on the line before each (if any)."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) <= {fence[0]}:
                break
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        marker = _marker_before(lines, start)
        options = parse_marker(marker) if marker is not None else {}
        out.append(Block(rel, start + 1, _lang(info), "\n".join(body) + "\n", "fenced", options))
    return out


def _marker_before(lines: list[str], index: int) -> str | None:
    """The marker on the nearest non-blank line above ``index``, if that line is a marker."""
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return None
    m = _MARKER.fullmatch(lines[j].strip())
    return m.group(1) if m else None


def _fence_mask(lines: list[str]) -> list[bool]:
    """True for the lines inside (or delimiting) a fenced block."""
    mask, fence = [], None
    for line in lines:
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            mask.append(True)
            continue
        if fence is not None:
            s = line.strip()
            mask.append(True)
            if s.startswith(fence) and set(s) <= {fence[0]}:
                fence = None
            continue
        mask.append(False)
    return mask


def is_command(code: str) -> bool:
    """An inline code span that a reader would type at a shell prompt.

    A subcommand's name alone (`seqpar plan`, `pip install`) names it in prose: an example has arguments.
    """
    words = code.split()
    if len(words) < 2 or words[0] not in COMMAND_WORDS:
        return False
    return len(words) >= 3 or words[0] not in ("seqpar", "pip") or words[1].startswith("-")


def inline_commands(path: Path) -> list[Block]:
    """The inline code spans of one Markdown file that are commands (a span may wrap onto the next line)."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    text = "\n".join("" if fenced else line for line, fenced in zip(lines, _fence_mask(lines)))
    out = []
    for m in _INLINE.finditer(text):
        code = " ".join(m.group("code").split())
        if not is_command(code):
            continue
        start = m.start("code")
        line = text.count("\n", 0, start) + 1
        col = start - (text.rfind("\n", 0, start) + 1)
        options = parse_marker(m.group("marker")) if m.group("marker") is not None else {}
        out.append(Block(rel, line, "shell", code + "\n", "inline", options, col))
    return out


def markdown_files() -> list[Path]:
    """README.md and every page under docs/ (build output excluded)."""
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
    return [ROOT / "README.md", *docs]


def help_examples(epilogs: dict[str, str]) -> list[Block]:
    """The command lines of ``--help`` epilogs, ``{subcommand: epilog}`` (an ``examples:`` section)."""
    out = []
    for name, epilog in sorted(epilogs.items()):
        for n, line in enumerate(epilog.splitlines(), start=1):
            code = line.strip()
            if not is_command(code):
                continue
            options: dict = {}
            command, _, comment = code.partition("  #")
            if comment and re.search(r"\bGPUs?\b", comment):
                options["gpu"] = True
            out.append(Block(f"seqpar {name} --help", n, "shell", command.strip() + "\n", "help", options))
    return out


def collect(epilogs: dict[str, str] | None = None) -> list[Block]:
    """Every block of every file, in file order, then the ``--help`` examples."""
    out: list[Block] = []
    for path in markdown_files():
        blocks = fenced_blocks(path) + inline_commands(path)
        out += sorted(blocks, key=lambda b: b.line)
    return out + help_examples(epilogs or {})
