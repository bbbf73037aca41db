# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.mta-installed
BUILD_INPUTS := setup.py pyproject.toml mta_kernels/_build_spec.py $(shell find mta_kernels/csrc -type f 2>/dev/null)
EXTRAS := distill,integrations,spacy,triton,dev
PYTEST_ARGS ?=

.PHONY: setup test demo bench lint gpu-check clean

setup: $(STAMP)

# A line per stage; pip's own output where it downloads (minutes on a fresh machine); the compile of the
# extension (about 1 min on 2 cores) reports its elapsed time every 30 s.
$(STAMP): $(BUILD_INPUTS)
	@echo "mta_kernels setup [1/5]: virtual environment $(VENV) (it sees the system's packages: a CUDA torch is reused)"
	@test -x $(PY) || $(PYTHON_BOOT) -m venv --system-site-packages $(VENV)
	@echo "mta_kernels setup [2/5]: build tools (pip, setuptools, wheel, ninja)"
	@$(PIP) install -q -U "pip>=24" "setuptools>=77" wheel ninja
	@echo "mta_kernels setup [3/5]: torch (the CPU wheel 2.13.0 only when no torch is importable)"
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PY) -c "import torch; print('  torch', torch.__version__, '(CUDA %s)' % torch.version.cuda)"
	@echo "mta_kernels setup [4/5]: the package (editable) and its dependencies, extras $(EXTRAS)"
	MTA_KERNELS_BUILD_EXT=0 $(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	@echo "mta_kernels setup [5/5]: the C++ extension, ahead of time against this torch (about 1 min on 2 cores)"
	@start=$$(date +%s); \
	( n=0; while sleep 1; do n=$$((n + 1)); [ $$((n % 30)) = 0 ] && echo "  ... still compiling, $$n s"; done ) & \
	ticker=$$!; \
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .; status=$$?; \
	kill $$ticker; wait $$ticker 2>/dev/null; \
	test $$status = 0 && echo "  compiled in $$(( $$(date +%s) - start )) s"; exit $$status
	@$(PY) -m mta_kernels.info --line
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
	rm -rf build dist $(VENV) mta_kernels/*.so mta_kernels/_C.build.json *.egg-info
