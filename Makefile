# Two entry points: `make demo` (install, then train and evaluate MMoE on Census-Income) and
# `make test` (install, then run the test suite). Both create the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Where the example datasets are found before any download is tried (see `mtrank datasets list`).
export MTRANK_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-fast lint kuairand clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,plot,serve,export]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mtrank demo

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

kuairand: install
	$(VENV)/bin/mtrank train examples/kuairand.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
