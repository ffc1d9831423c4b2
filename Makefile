# The two commands the README leads with:
#   make demo   install what is needed, then stream a spoken reply from the synthetic checkpoint to reply.wav
#   make test   install what is needed (incl. the transformers oracle), then run the whole CPU suite
PYTHON ?= python3
REPORT ?= benchmarks/results/latest
TRITON36_VENV ?= .venv-triton36

.PHONY: demo test install install-test unit compile-check-36 bench gpu-check gpu-check-dry

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

install-test:
	PYTHON=$(PYTHON) bash scripts/install.sh test

demo: install
	$(PYTHON) -m omni_rt demo

# Unit + oracle tests, the kernel compile check under triton 3.9 (installed) and 3.6 (the GPU machines'
# version, in a venv that shares everything else), and the benchmarks once each as a smoke test.
test: install-test
	$(PYTHON) -m pytest -q tests
	$(MAKE) compile-check-36
	OMNI_RT_LOADER_BENCH_CONFIG=tiny $(PYTHON) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider
	bash scripts/gpu_check.sh --dry-run

unit:
	$(PYTHON) -m pytest -q tests

compile-check-36:
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q --disable-pip-version-check "triton==3.6.0"
	$(TRITON36_VENV)/bin/python -m pytest -q tests/test_kernel_compile.py -p no:cacheprovider

bench:
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-json=$(REPORT)/bench.json

# One command for a lent GPU machine (offline; keeps its own torch/triton): see scripts/gpu_check.sh.
gpu-check:
	bash scripts/gpu_check.sh --report $(REPORT)
