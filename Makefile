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

.PHONY: train test lint data bench gpu-check seeds mutants clean

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

seeds: data $(VENV)/.installed
	$(PY) experiments/seeds.py $(ARGS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache
