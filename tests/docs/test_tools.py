"""The documentation's own tools: block extraction, output matching, the config-key table, the
figures' data and drawing, and the link checker (each can fail: a broken input is shown to fail)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from . import blocks as B
from .runner import matches

ROOT = Path(__file__).resolve().parents[2]


def _load(path: str):
    name = Path(path).stem + "_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# ------------------------------------------------------------------------------------- extraction

def test_markers_parse_and_refuse_what_they_do_not_know(tmp_path) -> None:
    assert B.parse_marker('ranks=4 setup=x reason="two words"') == {"ranks": 4, "setup": "x", "reason": "two words"}
    for bad in ("rank=4", "ranks=four", "gpu=yes", "skip", "ranks"):
        with pytest.raises(B.MarkerError):
            B.parse_marker(bad)


def test_fenced_blocks_inline_commands_and_markers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(B, "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text('Run `seqpar plan llama3-8b\n--seq-len 8k` or `seqpar plan` alone; `seqpar.plan(...)`.\n\n'
                    '<!-- test: ranks=2 -->\n```python\nprint(1)\n```\n\n'
                    '<!-- test: output -->\n```text\n1\n```\n\n'
                    '```mermaid\ngraph LR\n```\n'
                    '<!-- test: gpu -->`torchrun --nproc-per-node 8 x.py`\n')
    fenced = B.fenced_blocks(page)
    assert [(b.lang, b.options) for b in fenced] == [("python", {"ranks": 2}), ("text", {"output": True}),
                                                     ("mermaid", {})]
    inline = B.inline_commands(page)
    assert [(b.text.strip(), b.options, b.line) for b in inline] == [
        ("seqpar plan llama3-8b --seq-len 8k", {}, 1), ("torchrun --nproc-per-node 8 x.py", {"gpu": True}, 17)]


def test_help_examples_and_gpu_comments() -> None:
    found = B.help_examples({"check": "examples:\n  seqpar check --nproc 2\n"
                                      "  torchrun --nproc-per-node 8 -m seqpar.cli check  # on GPUs\n"})
    assert [(b.text.strip(), b.options) for b in found] == [
        ("seqpar check --nproc 2", {}), ("torchrun --nproc-per-node 8 -m seqpar.cli check", {"gpu": True})]


def test_output_matching() -> None:
    assert matches("a 1\nb ...\n", "a 1\nb 2.5 s\n")
    assert matches("first\n...\nlast\n", "first\nx\ny\nlast\n")
    assert matches("x  \n", "x\n")
    assert not matches("a 1\n", "a 2\n")
    assert not matches("a\n", "a\nb\n")


# -------------------------------------------------------------------------------- config keys

def test_every_training_config_key_is_documented() -> None:
    from seqpar.train import TrainConfig

    keys = _load("docs/_ext/seqpar_docs.py").config_keys()
    assert [k.name for k in keys] == [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [k.name for k in keys if not k.meaning]
    assert not missing, (f"TrainConfig fields without a meaning: {missing}: add them to the class docstring's "
                         f"Attributes section (docs/reference/config.md is generated from it)")


def test_config_key_meanings_come_from_docstring_then_comments() -> None:
    docs = _load("docs/_ext/seqpar_docs.py")

    @dataclasses.dataclass
    class Cfg:
        """A config.

        Attributes:
            a: from the docstring,
                on two lines.
        """

        a: int = 1
        #: from a comment above
        b: str = "x"
        c: dict = dataclasses.field(default_factory=lambda: {"kind": "recall"})  # trailing comment
        d: float | None = None

    rows = {k.name: k for k in docs.config_keys(Cfg)}
    assert rows["a"].meaning == "from the docstring, on two lines."
    assert (rows["b"].meaning, rows["b"].default) == ("from a comment above", '"x"')
    assert (rows["c"].meaning, rows["c"].default) == ("trailing comment", '{kind = "recall"}')
    assert (rows["d"].meaning, rows["d"].default) == ("", "(unset)")


# ------------------------------------------------------------------------------------ figures

def test_record_reads_a_benchmark_table(tmp_path) -> None:
    record = _load("docs/figures/record.py")
    md = tmp_path / "BENCH.md"
    md.write_text("# B\n\n## Speed (CPU)\n\n```\npython bench.py --n 2\n```\n\n| S | ms |\n|---|---|\n"
                  "| 512 | 1.5 |\n| 1024 | 3.0 |\n\n## Other\n\n| x |\n|---|\n| 9 |\n")
    assert record.main(["speed", "--benchmarks", str(md), "--heading", "Speed", "--machine", "a laptop",
                        "--date", "2026-12-03", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "speed.json").read_text())
    assert rec == {"name": "speed", "command": "python bench.py --n 2", "date": "2026-12-03", "machine": "a laptop",
                   "columns": ["S", "ms"], "rows": [["512", "1.5"], ["1024", "3.0"]]}


def test_every_figure_has_its_data_and_names_its_machine() -> None:
    plot = _load("docs/figures/plot.py")
    data = {p.stem for p in plot.DATA.glob("*.json")}
    assert set(plot.FIGURES) == data, "each figure draws one record of docs/figures/data and each record is drawn"
    for name in data:
        rec = plot.load(name)
        assert rec["command"] and rec["machine"] and rec["date"], name
        assert all(len(r) == len(rec["columns"]) for r in rec["rows"]), name


def test_figures_draw(tmp_path) -> None:
    pytest.importorskip("matplotlib")  # the docs extra; CI's docs build draws them too
    plot = _load("docs/figures/plot.py")
    for name in plot.FIGURES:
        assert plot.draw(name, tmp_path).stat().st_size > 1000


# -------------------------------------------------------------------------------- link check

def test_link_checker_finds_missing_files_and_anchors(tmp_path) -> None:
    check = _load("docs/check_links.py")
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text('<a href="sub/page.html#here">ok</a> <a href="#top">ok</a><p id="top"></p>'
                                         '<a href="https://example.com/x">external</a> <img src="missing.png">')
    (tmp_path / "sub" / "page.html").write_text('<h1 id="here"></h1><a href="../index.html#nowhere">bad</a>'
                                                '<a href="../gone.html">bad</a>')
    bad = check.broken_links(tmp_path)
    assert len(bad) == 3, bad
    assert any("missing.png" in b for b in bad) and any("nowhere" in b for b in bad) and any("gone" in b for b in bad)
    assert check.main([str(tmp_path)]) == 1
