# The two commands the README leads with:
#   make demo   install what is needed, then stream a spoken reply from the synthetic checkpoint to reply.wav
#   make test   install what is needed (incl. the transformers oracle), then run the whole CPU suite
# Which Python: scripts/env.sh decides (an active virtualenv or conda env, else the project's .venv, created by
# the install step; OMNI_RT_PYTHON=/path/python forces one). Every step below uses that same interpreter.
PY = $(shell bash scripts/env.sh --python)
REPORT ?= benchmarks/results/latest

.PHONY: demo test install install-test unit compile-check-36 bench gpu-check gpu-check-dry env serve

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

env:
	bash scripts/env.sh --print

demo: install
	$(PY) -m omni_rt demo

# Unit + oracle tests, the kernel compile check under triton 3.9 (installed) and 3.6 (the GPU machines' version,
# same Python and torch), and the benchmarks once each as a smoke test.
test: install-test
	$(PY) -m pytest -q tests
	$(MAKE) compile-check-36
	OMNI_RT_LOADER_BENCH_CONFIG=tiny $(PY) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider
	PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run

unit:
	$(PY) -m pytest -q tests

compile-check-36:
	bash scripts/triton36.sh

serve: install
	$(PY) -m omni_rt serve --synthetic tiny

bench:
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(REPORT)/bench.json

# One command for a lent GPU machine (offline; keeps its own torch/triton): see scripts/gpu_check.sh.
# Its Python: the env.sh choice when it exists (an active env, or a .venv made by make install), else python3.
gpu-check:
	P=$(PY); test -x "$$P" || P=python3; PYTHON=$$P bash scripts/gpu_check.sh --report $(REPORT)
