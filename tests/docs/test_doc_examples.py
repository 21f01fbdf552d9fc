"""Every command and code block of README.md, docs/ and ``seqpar <command> --help``, run as written.

The blocks are extracted from the files themselves (:mod:`tests.docs.blocks`), so an example is
tested the day it is written.  How a block runs is said by its marker (see ``blocks.py``);
blocks of one page run in order in one working directory (:mod:`tests.docs.runner`).

:data:`KNOWN` lists what cannot run as written today, each with the reason and who fixes it.  An
entry that no longer matches any block fails (``test_known_entries_are_current``), so the list
only shrinks.
"""
from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

import pytest

from . import blocks as B
from .runner import BlockFailed, Result, matches, parse_python, parse_shell, run_python, run_shell, workspace


def _epilogs() -> dict[str, str]:
    from seqpar.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.epilog or "" for name, p in sub.choices.items()}


#: (where, first command line or first code line) -> (what the test does instead, why; who fixes it)
#: "parse": the command's arguments are parsed by its own program, nothing runs;
#: "xfail": it runs and is expected to fail (strict: a fix makes the test fail until the entry goes).
KNOWN: dict[tuple[str, str], tuple[str, str]] = {
    ("README.md", "make demo"):
        ("parse", "make test is this test suite (CI runs it); make demo takes about three minutes, too long "
                  "for CI's budget beside the suite: tests/cli/test_demo.py runs the demo end to end at a "
                  "smaller size"),
    ("README.md", "from seqpar.models import LlamaForCausalLM"):
        ("parse", "the tour builds llama3-8b (32 GB of float32 weights) on every rank: needs a small model "
                  "(owner: A, the API tour)"),
    ("README.md", 'make demo ARGS="--strategy usp --ulysses 2"'):
        ("parse", "the full demo, minutes: too heavy for CI (owner: C)"),
    ("README.md", "torchrun --nproc-per-node 8 -m seqpar.cli train run.toml"):
        ("parse", "run.toml is a placeholder and 8 ranks; docs/howto has the runnable recipe (owner: C)"),
    ("README.md", "seqpar plan llama3-70b --seq-len 128k --gpus 32"):
        ("xfail", "exits 2: nothing fits in 80 GB at the default settings (owner: B, planner sentences)"),
    ("README.md", "torchrun --nproc-per-node 8 -m seqpar.cli generate --model PATH --prompt-file long.txt"):
        ("parse", "PATH and long.txt are placeholders, 8 GPUs; docs/howto/generation.md runs it (owner: E)"),
    ("seqpar plan --help", "seqpar plan llama3-70b --seq-len 1M --gpus 256 --tp 8 --json"):
        ("xfail", "exits 2: nothing fits in 80 GB at the default settings (owner: B)"),
    ("seqpar check --help", "torchrun --nproc-per-node 8 -m seqpar.cli check --dtype bfloat16 --seq-len 32768"):
        ("parse", "8 ranks at 32k in bf16 is a GPU command: its epilog line should end with '# on GPUs' "
                  "(owner: C)"),
    ("seqpar check --help", "seqpar check --heads 32 --kv-heads 8 --head-dim 128 --seq-len 4096"):
        ("parse", "32 heads x 4k at every world size takes minutes on CPU (owner: C)"),
}


def _first_line(block: B.Block) -> str:
    """The block's first code line; for shell blocks without its trailing comment (a comment may change)."""
    lines = [ln.strip() for ln in block.text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        return ""
    return re.sub(r"\s+#.*$", "", lines[0]) if block.lang in ("bash", "sh", "shell", "console") else lines[0]


def _known(block: B.Block) -> tuple[str, str] | None:
    return KNOWN.get((block.path, _first_line(block)))


def _runnable(block: B.Block) -> bool:
    return block.lang not in B.NOT_CODE and not block.lang.startswith("{")


try:
    ALL = [b for b in B.collect(_epilogs()) if _runnable(b)]
    COLLECT_ERROR = None
except B.MarkerError as e:  # reported by test_markers_parse instead of breaking collection
    ALL, COLLECT_ERROR = [], str(e)

PAGES: dict[str, list[B.Block]] = {}
for _b in ALL:
    PAGES.setdefault(_b.page, []).append(_b)


class _Page:
    """Progress through one page: its directory, what ran, the last output, each block's failure."""

    def __init__(self, root: Path):
        self.dir = workspace(root)
        self.done = 0
        self.last: Result | None = None
        self.last_parsed = False
        self.errors: dict[str, BaseException] = {}
        self.failed: str | None = None  # the first failure not expected (later blocks are skipped)


_STATE: dict[str, _Page] = {}
_DONE_COMMANDS: dict[str, Result] = {}  # inline/--help commands already run (the same text runs once)


@pytest.fixture(scope="session")
def docs_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs")


def _mode(block: B.Block) -> str:
    """run, parse, skip or xfail."""
    known = _known(block)
    if known:
        return known[0]
    o = block.options
    if o.get("skip"):
        return "skip"
    if o.get("parse"):
        return "parse"
    if o.get("gpu"):
        import torch

        wanted = max([int(n) for n in re.findall(r"--nproc-per-node[ =](\d+)", block.text)] or [1])
        return "run" if torch.cuda.is_available() and torch.cuda.device_count() >= wanted else "parse"
    return "run"


def _execute(block: B.Block, page: _Page, pool) -> None:
    o, mode = block.options, _mode(block)
    if o.get("output"):
        if page.last_parsed:
            return  # the block it shows the output of was only parsed
        if page.last is None:
            raise BlockFailed(f"{block.id}: an output block needs a block that runs before it")
        if not matches(block.text, page.last.output):
            diff = "\n".join(difflib.unified_diff(block.text.splitlines(), page.last.output.splitlines(),
                                                  "documented", "printed", lineterm=""))
            raise BlockFailed(f"{block.id}: the documented output differs from what the block before it "
                              f"printed ('...' matches anything):\n{diff}")
        return
    if o.get("file"):
        (page.dir / o["file"]).write_text(block.text)
        return
    if block.lang not in ("shell", "python"):
        raise BlockFailed(f"{block.id}: a {block.lang or 'plain'} block that nothing uses: mark it "
                          f"<!-- test: file=NAME --> (a later block reads it), output (it shows the output of the "
                          f"block before), or skip reason=\"...\"")
    if mode == "skip":
        page.last, page.last_parsed = None, True
        return
    if mode == "parse":
        (parse_shell if block.lang == "shell" else parse_python)(block, page.dir)
        page.last, page.last_parsed = None, True
        return
    key = block.text if block.kind != "fenced" else None
    if key is not None and key in _DONE_COMMANDS:
        page.last, page.last_parsed = _DONE_COMMANDS[key], False
        return
    result = run_shell(block, page.dir) if block.lang == "shell" else run_python(block, page.dir, pool)
    if key is not None:
        _DONE_COMMANDS[key] = result
    page.last, page.last_parsed = result, False


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_block(block: B.Block, pool, docs_tmp: Path) -> None:
    blocks = PAGES[block.page]
    page = _STATE.get(block.page)
    if page is None:
        page = _STATE[block.page] = _Page(docs_tmp / block.page.replace("/", "_").replace(" ", "_"))
    index = blocks.index(block)
    # the page's blocks up to this one run in order (a -k selection still gets the files they write)
    while page.done <= index and page.failed is None:
        current = blocks[page.done]
        page.done += 1
        try:
            _execute(current, page, pool)
        except Exception as e:
            page.errors[current.id] = e
            if _mode(current) != "xfail" and current.kind == "fenced":  # a recipe's later steps need it
                page.failed = current.id
    mode, known = _mode(block), _known(block)
    if block.id in page.errors:
        if mode == "xfail":
            pytest.xfail(known[1])  # type: ignore[index]
        error = page.errors[block.id]
        if isinstance(error, BlockFailed):  # the message says it all: no traceback of the test's own code
            pytest.fail(str(error), pytrace=False)
        raise error
    if page.done <= index:
        pytest.skip(f"an earlier block of this page failed: {page.failed}")
    if mode == "xfail":
        pytest.fail(f"{block.id} was expected to fail ({known[1]}) but ran: remove its KNOWN entry")  # type: ignore
    if mode == "parse":
        why = known[1] if known else block.options.get("reason", "needs the GPUs it names")
        pytest.skip(f"arguments parsed, not run: {why}")
    if mode == "skip":
        pytest.skip(block.options["reason"])


def test_markers_parse() -> None:
    assert COLLECT_ERROR is None, COLLECT_ERROR


def test_known_entries_are_current() -> None:
    present = {(b.path, _first_line(b)) for b in ALL}
    stale = [k for k in KNOWN if k not in present]
    assert not stale, f"KNOWN entries that match no block any more (remove them): {stale}"


def test_every_page_has_blocks_that_run() -> None:
    """A how-to guide is a runnable recipe: each has at least one block that really runs."""
    for page, blocks in PAGES.items():
        if page.startswith("docs/howto/") and not page.endswith("index.md"):
            assert any(_mode(b) == "run" and b.lang in ("shell", "python") and not b.options.get("output")
                       for b in blocks), f"{page} has no block that runs"
