# Two commands matter: `make demo` (generate an image) and `make test` (lint, then the test suite).
# Each builds .venv on first use: torch 2.13.0 is installed first, on its own, so that nothing
# afterwards can pull a CUDA build of torch (several GB) to satisfy a looser requirement.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo lint test test-slow bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,bench,hub]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m optimized_sd.demo $(if $(CKPT),--ckpt "$(CKPT)")

lint: $(STAMP)
	$(VENV)/bin/ruff check optimized_sd tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/optimized-sd bench $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/optimized-sd bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
