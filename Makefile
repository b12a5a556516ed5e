# Two commands matter: `make demo` (generate an image) and `make test` (lint, then the test suite).
# Each builds .venv on first use: torch 2.13.0 is installed first, on its own, so that nothing
# afterwards can pull a CUDA build of torch (several GB) to satisfy a looser requirement.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo lint test test-slow bench bench-quick clean browser-deps

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,bench,hub,ui,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m optimized_sd.demo $(if $(CKPT),--ckpt "$(CKPT)")

lint: $(STAMP)
	$(VENV)/bin/ruff check optimized_sd tests benchmarks

# Headless Chromium for the web UI's browser tests, from Debian's packages (no browser download).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "browser tests will be skipped: run 'sudo apt-get install chromium chromium-driver'"; fi; \
	fi

test: $(STAMP) lint browser-deps
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/optimized-sd bench $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/optimized-sd bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
