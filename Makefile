# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: demo test bench test-gpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[io,test,mpi,examples,kernels-check]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
	$(BIN)/python -m benchmarks --quick --out $(VENV)/bench-quick.json

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# GPU_PY=python3: run with an interpreter that already has CuPy and the test packages (an
# image with CUDA's Python stack, offline), instead of installing .[cuda12,test] into .venv.
GPU_PY    ?=
GPU_TESTS := $(shell grep -l 'mark.gpu' tests/test_*.py)
test-gpu:
ifeq ($(GPU_PY),)
	$(MAKE) $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[cuda12,test]'
	$(MAKE) test-gpu GPU_PY=$(BIN)/python
else
	$(GPU_PY) -m pytest -q -m gpu $(GPU_TESTS)
	mkdir -p $(VENV)
	JAX_PLATFORMS= $(GPU_PY) -m benchmarks --quick --gpu --out $(VENV)/bench-gpu.json
endif

clean:
	rm -rf $(VENV) build *.egg-info
