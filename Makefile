# Two commands: `make demo` runs the main job, `make test` runs the suite.
# Each creates .venv on a fresh machine. torch is pinned and installed first:
# a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqpar-installed

.PHONY: demo test lint install clean

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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
