"""Record a benchmark's table as JSON for the documentation's figures (``docs/figures/data/NAME.json``).

The benchmarks under ``benchmarks/`` print Markdown tables; ``BENCHMARKS.md`` keeps each one under
its heading with the command that produced it.  This script turns one of them into the JSON the
figures are drawn from (``docs/figures/plot.py``), with the command, the date and the machine::

    # from a fresh run
    python benchmarks/attention.py --nproc 2 --seq-lens 1024 4096 --reps 3 | tee run.md
    python docs/figures/record.py attention_cpu --table run.md \\
        --command "python benchmarks/attention.py --nproc 2 --seq-lens 1024 4096 --reps 3" \\
        --machine "..." --date 2026-12-03
    # from what BENCHMARKS.md already records (the command is the first code block under the heading)
    python docs/figures/record.py attention_cpu --benchmarks BENCHMARKS.md \\
        --heading "Attention strategies vs single-device SDPA" --machine "..." --date 2026-11-24
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in ``text``: (header, rows), cells stripped."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\s*\|[\s|:-]+\|\s*",
                                                                                         lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def section(text: str, heading: str) -> str:
    """The text under the ``##`` heading that starts with ``heading``, up to the next ``##``."""
    m = re.search(rf"^##+ {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        raise SystemExit(f"record: no heading starting with {heading!r}")
    return m.group(1)


def first_command(text: str) -> str:
    m = re.search(r"^```\w*\n(.*?)^```", text, re.M | re.S)
    if not m:
        raise SystemExit("record: no command block under that heading; pass --command")
    return " ".join(m.group(1).replace("\\\n", " ").split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="figure data name: docs/figures/data/NAME.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", metavar="FILE", help="a benchmark's printed output (its Markdown table)")
    src.add_argument("--benchmarks", metavar="BENCHMARKS.md", help="take the table from this file's --heading")
    p.add_argument("--heading", help="(--benchmarks) the section's heading, or its beginning")
    p.add_argument("--index", type=int, default=0, help="which table of the section / file (default the first)")
    p.add_argument("--command", help="the command that measured it (default: the section's first code block)")
    p.add_argument("--machine", required=True, help="what it ran on, in words")
    p.add_argument("--date", required=True, help="when it was measured (YYYY-MM-DD)")
    p.add_argument("--out", type=Path, default=DATA, help="folder of the JSON (default docs/figures/data)")
    ns = p.parse_args(argv)
    if ns.benchmarks:
        if not ns.heading:
            p.error("--benchmarks needs --heading")
        text = section(Path(ns.benchmarks).read_text(), ns.heading)
        command = ns.command or first_command(text)
    else:
        text = Path(ns.table).read_text()
        if not ns.command:
            p.error("--table needs --command")
        command = ns.command
    found = tables(text)
    if ns.index >= len(found):
        raise SystemExit(f"record: {len(found)} table(s) there, no table {ns.index}")
    header, rows = found[ns.index]
    record = {"name": ns.name, "command": command, "date": ns.date, "machine": ns.machine,
              "columns": header, "rows": rows}
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"{ns.name}.json"
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items() if k != "rows")
    lines = ",\n".join(f"    {json.dumps(r)}" for r in rows)  # one row per line: diffs read like the table
    path.write_text(f"{{\n{body},\n  \"rows\": [\n{lines}\n  ]\n}}\n")
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
