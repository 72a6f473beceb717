# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'  # one command: nothing may pull another torch
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpmlab sample --model mnist --label grid --solver ddim --nfe 20 -n 100 --seed 0 --out demo/mnist.png --overwrite

test: $(STAMP)
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/solvers_vs_peers.py

clean:
	rm -rf $(VENV) demo build *.egg-info src/*.egg-info
