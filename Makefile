# Two commands do all set-up on a fresh Debian 12 / Python 3.11 machine without a GPU:
#   make demo    the demo (MNIST-5k, 10% labels: supervised-only vs Mean Teacher)
#   make test    the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel: an unpinned torch would make pip fetch a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint bench gpu-check gpu-check-cpu gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PIN)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/mtdist demo

test: setup
	$(PY) -m pytest -q

# every benchmark, ratios measured side by side (about 2.5 minutes on 2 cores); see benchmarks/RESULTS.md
bench: setup
	$(PY) -m benchmarks

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The whole GPU path in one command on a GPU machine (benchmarks/gpu_check.py; about 5 minutes, 8 at most):
# CUDA-marked tests, a 100-step train killed and resumed, gpu_step.py at batch 50 and 128; one table.
# That machine has no package registry: first `make gpu-wheels` here, and bring .gpu-wheels/ along.
gpu-check:
	sh benchmarks/gpu_check.sh

# the same steps, small, on this machine's CPU (tests/test_gpu_check.py runs it)
gpu-check-cpu: setup
	$(PY) -m benchmarks.gpu_check --cpu

# cp312 manylinux x86_64 wheels of what the GPU image lacks, into .gpu-wheels/ (ignored; about 7 MiB)
gpu-wheels: setup
	$(PY) -m benchmarks.gpu_wheels --out .gpu-wheels
