# ProcessDistro — every target sets up what it needs on first use.
#   make up      start the controller (embedded Redis unless PD_REDIS_URL is set)
#   make test    the whole test suite (real Redis, real Chromium, real wasmtime)
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help install up test wasm wasm-check bench compare lint schema browser node prometheus tmux clean wasi-toolchain examples wasm-toolchain rust-example \
	local-images compose-e2e swarm-e2e

help:
	@echo "make up        start ProcessDistro and print the join link"
	@echo "make test      run the test suite (installs what it needs first)"
	@echo "make install   create .venv/ and install the project with its test extras"
	@echo "make wasm      rebuild static/wasm/*.wasm from wasm_tasks/"
	@echo "make examples  build the examples under examples/: WASI commands in C (and their native twins)"
	@echo "               and pd-ABI modules in Rust (\`make rust-example\` builds only those)"
	@echo "make bench     run the benchmarks under bench/"
	@echo "make compare   ProcessDistro vs Dask vs Ray, same kernel and tiles (QUICK=1: a short run)"
	@echo "make lint      ruff and mypy"
	@echo "make schema    export the protocol's JSON Schemas to shared/schema/"
	@echo "make screenshots  docs/img/dashboard-*.png from the dashboard's Chromium test"
	@echo "make compose-e2e  docker compose up (3 aggregators), a job from the host through kills, checked, torn down"
	@echo "make swarm-e2e    the same on a one-node Docker Swarm (docker stack deploy)"
	@echo "make local-images base, Python, Redis and Prometheus images from Debian's packages (no registry)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ProcessDistro needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/processdistro up

browser:
	@bash scripts/ensure_chromium.sh

node:
	@bash scripts/ensure_node.sh

# prometheus and promtool for tests/test_prometheus.py (Debian's package)
prometheus:
	@bash scripts/ensure_prometheus.sh

tmux:
	@bash scripts/ensure_tmux.sh

test: install browser node tmux examples prometheus
	$(PY) -m pytest

wasm:
	bash wasm_tasks/build.sh

wasi-toolchain:
	@bash scripts/ensure_wasi_toolchain.sh

examples: wasi-toolchain wasm-toolchain
	$(MAKE) -C examples all rust

# the wasm32 Rust toolchain of `make wasm` (Debian's, unless rustup has the target)
wasm-toolchain:
	@bash .ci/ensure_wasm_toolchain.sh

rust-example: wasm-toolchain
	$(MAKE) -C examples rust

wasm-check:
	bash wasm_tasks/check.sh

bench: install
	$(PY) -m bench

# ProcessDistro vs Dask vs Ray on the same kernel and tiles (bench/compare.py; Dask and Ray
# go into .bench-venv/ on first use)
compare: install
	$(PY) -m bench --only compare $(if $(QUICK),--quick)

lint: install
	$(VENV)/bin/ruff check .
	bash scripts/lint_tree.sh >/dev/null
	MYPYPATH=.lint $(VENV)/bin/mypy -p processdistro

.PHONY: screenshots
screenshots: install browser
	PD_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_dashboard_browser.py

schema: install
	$(VENV)/bin/processdistro schema --out shared/schema

clean:
	rm -rf $(VENV) wasm_tasks/target .pytest_cache .mypy_cache .ruff_cache .lint
	$(MAKE) -C examples clean

# Containers (services/README.md): need a Docker engine (DOCKER_HOST is respected); where the
# image registry is unreachable they build stand-ins from Debian's packages first.
local-images:
	bash services/local-images.sh

compose-e2e: install
	bash .ci/compose_e2e.sh

swarm-e2e: install
	bash .ci/swarm_e2e.sh
