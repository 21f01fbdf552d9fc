"""Sphinx directives that generate pages' content from the code, so nothing is copied by hand.

* ``{seqpar-config-keys}``: every key of a ``seqpar train`` config, with its type, default and
  meaning, from :class:`seqpar.train.TrainConfig` itself (:func:`config_keys`).
* ``{seqpar-figure} NAME``: a figure drawn by ``docs/figures/plot.py`` from
  ``docs/figures/data/NAME.json``, captioned with the machine, the date and the command.
* ``{seqpar-plan-plot} ARGS``: the plot ``seqpar plan ARGS --plot FILE`` draws, made at build time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
GENERATED = DOCS / "_generated"


@dataclass
class ConfigKey:
    name: str
    type: str
    default: str
    meaning: str


def _docstring_attributes(cls) -> dict[str, str]:
    """``name: text`` entries of the class docstring's ``Attributes:`` section (Google style)."""
    doc = inspect.getdoc(cls) or ""
    m = re.search(r"^Attributes:\n(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if not m:
        return {}
    out: dict[str, str] = {}
    name = None
    for line in m.group(1).splitlines():
        entry = re.match(r"^    (\w+)(?: \(.*?\))?:\s*(.*)$", line)
        if entry:
            name = entry.group(1)
            out[name] = entry.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
    return out


def _source_comments(cls) -> dict[str, str]:
    """Field comments in the class body: a trailing ``# text`` or a ``#: text`` line above the field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#:"):
            above.append(s[2:].strip())
            continue
        m = re.match(r"^(\w+)\s*:[^#]*?(?:#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "return")):
            text = " ".join(above) or (m.group(2) or "")
            if text:
                out[m.group(1)] = text.strip()
        above = []
    return out


def _toml(value) -> str:
    """A default as it is written in a TOML config."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def config_keys(cls=None) -> list[ConfigKey]:
    """Every field of ``cls`` (default :class:`seqpar.train.TrainConfig`) as a documented config key.

    The meaning comes from the class docstring's ``Attributes:`` section, else from the field's
    comment in the source; a field with neither has an empty meaning (the tests refuse that).
    """
    if cls is None:
        from seqpar.train import TrainConfig

        cls = TrainConfig
    documented = {**_source_comments(cls), **_docstring_attributes(cls)}
    keys = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _toml(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _toml(f.default_factory())
        else:
            default = "(required)"
        type_ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        keys.append(ConfigKey(f.name, type_.replace("typing.", ""), default, documented.get(f.name, "")))
    return keys


def config_table_markdown(cls=None) -> str:
    """The keys as a Markdown table (what the directive renders)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in config_keys(cls):
        cells = [f"`{k.name}`", f"`{k.type}`", f"`{k.default}`", k.meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def setup(app):
    from docutils import nodes
    from docutils.parsers.rst import directives
    from sphinx.util.docutils import SphinxDirective

    class ConfigKeys(SphinxDirective):
        """Renders :func:`config_table_markdown` as MyST Markdown."""

        has_content = False

        def run(self):
            return self.parse_text_to_nodes(config_table_markdown())

    class Figure(SphinxDirective):
        required_arguments = 1
        option_spec = {"alt": directives.unchanged}

        def run(self):
            sys.path.insert(0, str(DOCS / "figures"))
            try:
                import plot
            finally:
                sys.path.pop(0)
            name = self.arguments[0]
            if name not in plot.FIGURES:
                raise self.error(f"no figure {name!r} in docs/figures/plot.py: {sorted(plot.FIGURES)}")
            path = plot.draw(name, GENERATED)
            self.env.note_dependency(str(plot.DATA / f"{name}.json"))
            self.env.note_dependency(plot.__file__)
            rec = plot.load(name)
            caption = (f"{plot.FIGURES[name][2]}: measured on {rec['machine']}, {rec['date']}, with "
                       f"`{rec['command']}` (data: `docs/figures/data/{name}.json`).")
            return _figure(self, nodes, "/" + str(path.relative_to(DOCS)), caption,
                           self.options.get("alt", plot.FIGURES[name][2]))

    class PlanPlot(SphinxDirective):
        required_arguments = 1
        final_argument_whitespace = True

        def run(self):
            from seqpar.cli import main

            args = self.arguments[0].split()
            tag = hashlib.sha1(" ".join(args).encode()).hexdigest()[:10]
            GENERATED.mkdir(exist_ok=True)
            path = GENERATED / f"plan-{tag}.png"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                status = main(["plan", *args, "--plot", str(path)])
            if status != 0:
                raise self.error(f"seqpar plan {' '.join(args)} failed: {err.getvalue().strip()}")
            caption = (f"Drawn by `seqpar plan {' '.join(args)} --plot FILE.png` from the planner's model "
                       f"(no measurement: the analytic costs of every layout).")
            return _figure(self, nodes, "/" + str(path.relative_to(DOCS)), caption, "seqpar plan --plot")

    app.connect("autodoc-process-docstring", _note_module)
    app.connect("autodoc-skip-member", _skip_reexport)
    app.add_directive("seqpar-config-keys", ConfigKeys)
    app.add_directive("seqpar-figure", Figure)
    app.add_directive("seqpar-plan-plot", PlanPlot)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


_CURRENT_MODULE: list[str] = [""]


def _note_module(app, what, name, obj, options, lines) -> None:
    if what == "module":
        _CURRENT_MODULE[0] = name


def _skip_reexport(app, what, name, obj, skip, options):
    """A module's ``__all__`` may re-export another layer's names (``hf.causal_lm_loss`` is
    ``seqpar.train.causal_lm_loss``): document each object once, where it is defined."""
    module = getattr(obj, "__module__", None)
    current = _CURRENT_MODULE[0]
    if what != "module" or not current or not module or not module.startswith("seqpar"):
        return None
    mod = sys.modules.get(current)
    package = current if hasattr(mod, "__path__") else current.rpartition(".")[0]
    return True if not (module == package or module.startswith(package + ".")) else None


def _figure(directive, nodes, uri: str, caption: str, alt: str):
    figure = nodes.figure()
    figure += nodes.image(uri=uri, alt=alt)
    cap = nodes.caption()
    cap += directive.parse_inline(caption, lineno=directive.lineno)[0]
    figure += cap
    return [figure]


__all__ = ["ConfigKey", "config_keys", "config_table_markdown", "setup"]
