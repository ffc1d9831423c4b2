#!/usr/bin/env bash
# Install omni_rt and what it needs into the Python that scripts/env.sh chooses, never pulling a CUDA torch.
#   scripts/install.sh            runtime deps (+ the [serve] extra)
#   scripts/install.sh test       + the [test] extra (transformers 5.23.0 oracle, pytest, the serving clients, Ray)
#                                 and silero-vad (without its extras: they pin a torchaudio that would replace torch)
# That Python is: an active virtualenv or conda env (kept as it is, its torch/triton included), else the project's
# .venv (created here; a Debian/Ubuntu system Python refuses pip installs, PEP 668). With no torch in it,
# torch==2.13.0 takes the CPU wheel that lies on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/env.sh --ensure)
echo "[install] python: $PY ($(bash scripts/env.sh --print | sed -n 's/^MODE=//p'))"
# --no-compile: byte-compiling every installed file (ray, transformers: thousands) costs minutes on 2 cores;
# Python compiles what it imports on first use.
PIP="$PY -m pip install -q --disable-pip-version-check --no-compile"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing torch==2.13.0 (CPU wheel)"
  $PIP "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  echo "[install] triton not found: installing triton==3.9.0"
  $PIP "triton==3.9.0"
fi
# Build requirements first: --no-build-isolation builds _C against what is here (no isolated env that could
# pull a torch of its own).
$PIP pybind11 "setuptools>=70.1" wheel
EXTRAS="audio,serve"
if [ "${1:-}" = "test" ]; then
  EXTRAS="test"
fi
$PIP --no-build-isolation -e ".[$EXTRAS]"
if [ "${1:-}" = "test" ]; then
  # silero-vad's own requirements are torch (present) and packaging; --no-deps keeps torch as it is.
  $PIP --no-deps "silero-vad>=5.1"
  $PIP packaging
fi
"$PY" -c "import torch, omni_rt, omni_rt._C; print('[install] omni_rt', omni_rt.__version__, 'with _C; torch', torch.__version__)"
