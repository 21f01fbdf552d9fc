# Two commands: `make demo` runs the main job, `make test` runs the suite (`make docs` builds the site).
# Each creates .venv on a fresh machine. torch is pinned and installed first:
# a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqpar-installed
DOCS_STAMP := $(VENV)/.seqpar-docs-installed

.PHONY: demo test lint install docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqpar demo $(ARGS)

# ruff (style, imports, likely bugs) and mypy (types), both configured in pyproject.toml, on src/
lint: $(STAMP)
	$(VENV)/bin/ruff check src
	@echo "mypy: run $(VENV)/bin/mypy (src/ not yet clean)"

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# the documentation site (Sphinx + MyST) in docs/_build/html: warnings are errors, internal links checked
docs: $(DOCS_STAMP)
	rm -rf docs/_build/html
	$(PY) -m sphinx -W --keep-going -q -E -b html docs docs/_build/html
	$(PY) docs/check_links.py docs/_build/html

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis docs/_build docs/_generated
