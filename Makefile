# Two commands do all set-up on a fresh Debian 12 / Python 3.11 machine without a GPU:
#   make demo    the demo (MNIST-5k, 10% labels: supervised-only vs Mean Teacher)
#   make test    the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel: an unpinned torch would make pip fetch a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint bench
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

# every benchmark, ratios measured side by side (about 5 minutes on 2 cores); see benchmarks/RESULTS.md
bench: setup
	$(PY) -m benchmarks

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
