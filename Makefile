# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.mta-installed
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup test demo bench lint gpu-check clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || $(PYTHON_BOOT) -m venv --system-site-packages $(VENV)
	@$(PIP) install -q -U "pip>=24" "setuptools>=77" wheel ninja
	@# Reuse an importable torch (a CUDA build, say); install the CPU 2.13.0 wheel only when none is.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PY) -c "import torch; print('mta_kernels setup: torch', torch.__version__, '(cuda %s)' % torch.version.cuda)"
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation -e ".[distill,integrations,spacy,dev]"
	@$(PY) -c "import mta_kernels, sys; print('mta_kernels setup: extension', mta_kernels.layout.extension_path())"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m mta_kernels.distill demo

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check mta_kernels tests benchmarks setup.py
	$(PY) -m ruff format --check mta_kernels tests benchmarks setup.py

# On a GPU machine (offline): build, the kernel tests' verdict, then the GPU benchmarks, each stage in its
# own time box (under 9 minutes in all); results in benchmarks/results/<device>-<date>/. The plan without a
# GPU: bash benchmarks/gpu_check.sh --cpu
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build $(VENV) mta_kernels/*.so *.egg-info
