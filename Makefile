# Quick start: `make demo` (train the tiny MoE recipe on CPU) and `make test` (the test suite).
# Both create .venv, install torch and the package (compiling moe_a2a._C where nvcc is found) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
MEGATRON_CORE_VERSION ?= 0.16.1
PYTEST_ARGS ?=

.PHONY: setup build test demo bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy pyyaml pytest ninja pybind11 tqdm matplotlib
	$(PY) -m pip install -q megatron-core==$(MEGATRON_CORE_VERSION) || echo "megatron-core not installed: its tests will be skipped"
	touch $@

setup: $(VENV)/.deps

# Editable install: the compiled moe_a2a._C lands next to the sources, so tests import the tree.
build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Trains recipes/tiny_moe_cpu.yaml from scratch on 4 CPU ranks (EP 4) and prints the validation loss.
demo: build
	$(PY) -m moe_a2a train recipes/tiny_moe_cpu.yaml train.resume=false

bench: build
	$(PY) -m benchmarks intranode

clean:
	rm -rf build *.egg-info moe_a2a/_C*.so
