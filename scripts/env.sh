#!/usr/bin/env bash
# Which Python every step of `make demo` / `make test` uses: the one place that decides it.
#
#   scripts/env.sh --python    print the interpreter to install into and run with
#   scripts/env.sh --print     print the whole decision as KEY=VALUE lines (a dry run: creates nothing);
#                              tests/test_env_script.py checks it with fake VIRTUAL_ENV / CONDA_PREFIX
#   scripts/env.sh --ensure    create the project virtualenv when the decision says so, then print the interpreter
#
# The rule, in order:
#   1. OMNI_RT_PYTHON=/path/to/python       that interpreter, as it is (MODE=explicit)
#   2. an active virtualenv ($VIRTUAL_ENV)   its python, keeping its torch/triton (MODE=virtualenv)
#   3. an active conda env ($CONDA_PREFIX)   its python, keeping its torch/triton (MODE=conda)
#   4. otherwise the project's .venv         created from `python3` (a Debian/Ubuntu system Python refuses
#                                            `pip install`, PEP 668), MODE=project-venv
# torch==2.13.0 is installed (scripts/install.sh) only when the chosen interpreter has no torch.
# The triton-3.6 compile check runs with the SAME interpreter, with triton 3.6 installed by
# `pip install --target $TRITON36_DIR` and that folder put first on PYTHONPATH: it shadows the installed triton and
# nothing else, so torch (and everything else) is whatever the rest of the suite sees.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV_DIR=${OMNI_RT_VENV:-$ROOT/.venv}
TRITON36_DIR=${OMNI_RT_TRITON36_DIR:-$ROOT/.triton36}
BASE_PYTHON=${OMNI_RT_BASE_PYTHON:-python3}

if [ -n "${OMNI_RT_PYTHON:-}" ]; then
  MODE=explicit; PY=$OMNI_RT_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  MODE=virtualenv; PY=$VIRTUAL_ENV/bin/python
elif [ -n "${CONDA_PREFIX:-}" ]; then
  MODE=conda; PY=$CONDA_PREFIX/bin/python
else
  MODE=project-venv; PY=$VENV_DIR/bin/python
fi
CREATE_VENV=0
if [ "$MODE" = project-venv ] && [ ! -x "$PY" ]; then CREATE_VENV=1; fi

case "${1:---python}" in
  --python)
    echo "$PY" ;;
  --print)
    echo "MODE=$MODE"
    echo "PYTHON=$PY"
    echo "CREATE_VENV=$CREATE_VENV"
    echo "VENV_CREATE_FROM=$([ "$CREATE_VENV" = 1 ] && echo "$BASE_PYTHON" || echo -)"
    echo "INSTALL_PYTHON=$PY"
    echo "TEST_PYTHON=$PY"
    echo "TRITON36_PYTHON=$PY"
    echo "TRITON36_DIR=$TRITON36_DIR"
    echo "TRITON36_PYTHONPATH=$TRITON36_DIR${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  --ensure)
    if [ "$CREATE_VENV" = 1 ]; then
      echo "[env] no virtualenv or conda env is active: creating the project virtualenv $VENV_DIR from $BASE_PYTHON" >&2
      "$BASE_PYTHON" -m venv "$VENV_DIR" >&2 || {
        echo "[env] '$BASE_PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
    fi
    if [ ! -x "$PY" ]; then echo "[env] $PY is not an executable Python ($MODE)" >&2; exit 1; fi
    echo "$PY" ;;
  *)
    echo "usage: $0 [--python | --print | --ensure]" >&2; exit 2 ;;
esac
