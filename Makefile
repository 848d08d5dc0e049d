# The two commands of the README, each doing its own set-up:
#   make train   trains LeNet-BN on Fashion-MNIST for 10 epochs (configs/lenet_bn.py)
#   make test    runs ruff and the test suite (what CI runs)
# Both create .venv, install jaxbn into it and find the data first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
IDX_DIR := /usr/share/datasets/fashion-mnist
CONFIG ?= configs/lenet_bn.py
ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: train test lint data bench gpu-check seeds mutants peer clean test-lowest package docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# TensorFlow is only needed when tfds must download and prepare the data.
	if [ -f $(IDX_DIR)/train-images-idx3-ubyte.gz ]; then \
	  $(PY) -m pip install --quiet -e '.[train,test]'; \
	else \
	  $(PY) -m pip install --quiet -e '.[train,test,tf]'; \
	fi
	touch $@

# Debian's copy of Fashion-MNIST (no internet needed); elsewhere tfds downloads it.
data:
	@if [ -f $(IDX_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "data: Fashion-MNIST IDX files in $(IDX_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "data: no $(IDX_DIR); train.py will let tensorflow-datasets download it"; \
	fi

train: data $(VENV)/.installed
	$(PY) train.py --config $(CONFIG) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: data $(VENV)/.installed lint
	$(PY) -m pytest -n 2 --durations=10

bench: data $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/throughput.py --repeats 15 --out results/throughput $(ARGS)
	$(PY) benchmarks/separate.py --out results/separate
	$(PY) benchmarks/separate.py --isa avx2 --out results/separate-avx2
	$(PY) benchmarks/separate.py --isa avx2 --variants 'torch nn.BatchNorm' 'jaxbn LeNet, norm=jaxbn' \
	  --passes 13 --scripts 0 --out results/separate-avx2-jaxbn

# On a GPU machine: accelerator tests, 10 epochs and throughput into one JSON (README, Speed,
# GPU). Installs nothing (GPU machines may be offline): it takes the first of .venv's Python
# and $(PYTHON) whose JAX sees a GPU (else .venv's, whose script then says so); GPU_PY=... overrides.
GPU_PY ?= $(or $(shell for py in $(PY) $(PYTHON); do \
  $$py -c 'import jax; assert jax.default_backend() != "cpu"' 2>/dev/null && echo $$py && break; \
  done),$(wildcard $(PY)),$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --json results/gpu/results.json $(ARGS)

# Deliberate bugs in a copy of jaxbn; fails if a test misses one (tests/mutants.py).
mutants: data $(VENV)/.installed
	$(PY) tests/mutants.py $(ARGS)

# Flax's own tests that use BatchNorm, run with Flax's layers and with jaxbn's in their place;
# fails if one passes with Flax only (tools/flax_peer.py). cloudpickle: a test-only need of Flax's.
peer: data $(VENV)/.installed
	$(PY) -m pip install --quiet 'cloudpickle>=3.0.0'
	$(PY) tools/flax_peer.py --out results/peer $(ARGS)

# The documentation site (docs/_build/html): the API reference, the chapter and the how-tos
# executed on the CPU; any Sphinx warning fails it.
$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

docs: data $(VENV)/.installed-docs
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

seeds: data $(VENV)/.installed
	$(PY) experiments/seeds.py $(ARGS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache build

# The library's tests (tools/library_tests.py) at the lowest versions that pyproject.toml
# claims (tools/lowest.py: jax, jaxlib, flax, numpy pinned with ==), on the lowest Python
# it claims, in a venv of their own that holds jaxbn without extras and the test tools;
# tools/smoke.py first, on the installed copy.
LOWEST_PYTHON ?= python3.11
LOWEST_VENV := build/venv-lowest
# chex is pinned to a release that supports the lowest jax (checked: chex 0.1.92, jax 0.8.1).
LOWEST_TOOLS := chex==0.1.92 absl-py pytest pytest-xdist hypothesis
WORKERS ?= 2
test-lowest:
	$(PYTHON) tools/library_tests.py --check
	rm -rf $(LOWEST_VENV)
	$(LOWEST_PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install --quiet $$($(PYTHON) tools/lowest.py pins) $(LOWEST_TOOLS) .
	$(LOWEST_VENV)/bin/python -m pip check
	$(LOWEST_VENV)/bin/python tools/lowest.py verify
	cd /tmp && $(CURDIR)/$(LOWEST_VENV)/bin/python $(CURDIR)/tools/smoke.py
	$(LOWEST_VENV)/bin/python -m pytest -n $(WORKERS) -p no:cacheprovider \
	  $$($(PYTHON) tools/library_tests.py)

# The sdist and the wheel (build/dist, the wheel built from the sdist), `twine check`, then
# the wheel without extras in a fresh venv and tools/smoke.py run there from /tmp, so
# that it imports the installed jaxbn and not the working tree.
DIST := build/dist
BUILD_VENV := build/venv-build
PACKAGE_VENV := build/venv-package
package:
	rm -rf $(DIST) $(BUILD_VENV) $(PACKAGE_VENV)
	$(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install --quiet --upgrade pip build twine
	$(BUILD_VENV)/bin/python -m build --outdir $(DIST) .
	$(BUILD_VENV)/bin/python -m twine check --strict $(DIST)/*
	$(BUILD_VENV)/bin/python -c 'import sys, zipfile; \
	  print("wheel holds:", *sorted({n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()}))' \
	  $(DIST)/*.whl
	$(PYTHON) -m venv $(PACKAGE_VENV)
	$(PACKAGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PACKAGE_VENV)/bin/python -m pip install --quiet $(DIST)/*.whl
	$(PACKAGE_VENV)/bin/python -m pip check
	cd /tmp && $(CURDIR)/$(PACKAGE_VENV)/bin/python $(CURDIR)/tools/smoke.py
