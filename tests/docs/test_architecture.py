"""The import rule drawn in docs/architecture.md holds for every module of src/seqpar.

The page's table (``| layer | imports from |``) is the rule; this test reads it from the page, so
the drawing and the code cannot part: an import that breaks the layering fails here, and so
does a table that no longer matches the package's folders.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "seqpar"
PAGE = ROOT / "docs" / "architecture.md"
SHORT = {"comm", "kernels", "stats", "layout", "mesh", "errors", "masks", "packing", "debug", "configs",
         "fused_merge"}  # seqpar.<name> short names of the core modules


def rule() -> dict[str, set[str]]:
    rows = re.findall(r"^\| *([a-z_]+) *\| *([a-z_, ]*?) *\|$", PAGE.read_text(), re.M)
    table = {layer: {x.strip() for x in deps.split(",") if x.strip()} for layer, deps in rows if layer != "layer"}
    assert table, "docs/architecture.md has no '| layer | imports from |' table"
    return table


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "seqpar" or len(parts) < 2:
        return None
    return "core" if parts[1] in SHORT else parts[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """Every seqpar module (or name) imported by ``path``, relative imports resolved, with its line."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; an __init__'s package is its own folder
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(x for x in (base, node.module or "") if x)
            # `from .. import inference` names a module: check each imported name too
            out += [(node.lineno, target)] + [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t.startswith("seqpar.")]


def test_layers_in_the_table_are_the_packages_folders() -> None:
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(rule()) == folders, (f"docs/architecture.md's table lists {sorted(rule())}, the package has "
                                    f"{sorted(folders)}: draw the new layer")


def test_imports_run_one_way() -> None:
    table = rule()
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        own = path.relative_to(PKG).parts[0]
        if own not in table:  # the facade (seqpar/__init__.py, _compat.py) re-exports every layer
            continue
        for line, target in imports(path):
            layer = layer_of(target)
            if layer is None or layer == own or layer not in table:
                continue
            if layer not in table[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({own} -> {layer})")
    assert not bad, "imports against docs/architecture.md's layering:\n" + "\n".join(bad)


def test_the_rule_has_no_cycle() -> None:
    table = rule()
    seen: dict[str, int] = {}

    def visit(layer: str, path: list[str]) -> None:
        assert seen.get(layer) != 1, f"cycle: {' -> '.join(path + [layer])}"
        if seen.get(layer) == 2:
            return
        seen[layer] = 1
        for dep in table[layer]:
            visit(dep, path + [layer])
        seen[layer] = 2

    for layer in table:
        visit(layer, [])
