#!/usr/bin/env bash
# Install omni_rt and what it needs into the current Python, without ever pulling a CUDA torch.
#   scripts/install.sh            runtime deps
#   scripts/install.sh test       + test deps (transformers 5.23.0 oracle, pytest, pytest-benchmark)
# An already-installed torch (a GPU box has its own) is kept; with none, torch==2.13.0 takes the CPU wheel
# that lies on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"

if ! $PY -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing torch==2.13.0 (CPU wheel)"
  $PIP "torch==2.13.0"
fi
if ! $PY -c "import triton" 2>/dev/null; then
  echo "[install] triton not found: installing triton==3.9.0"
  $PIP "triton==3.9.0"
fi
$PIP pybind11 "setuptools>=70.1" wheel numpy safetensors tokenizers jinja2 soundfile scipy tqdm
if [ "${1:-}" = "test" ]; then
  $PIP pytest pytest-benchmark "transformers==5.23.0"
fi
# --no-build-isolation: build against the torch already here; --no-deps: install_requires is covered above.
$PIP --no-build-isolation --no-deps -e .
$PY -c "import omni_rt, omni_rt._C; print('[install] omni_rt', omni_rt.__version__, 'with _C')"
