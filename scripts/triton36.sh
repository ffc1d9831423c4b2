#!/usr/bin/env bash
# The kernel compile check under triton 3.6 (the GPU machines' version) with the SAME Python and torch as the rest
# of the suite: triton 3.6 goes into a --target folder put first on PYTHONPATH, shadowing the installed triton only.
#   scripts/triton36.sh            install (once) and run tests/test_kernel_compile.py
#   scripts/triton36.sh --check    only verify that the chosen Python imports torch and triton 3.6 from there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/env.sh --python)
DIR=$(bash scripts/env.sh --print | sed -n 's/^TRITON36_DIR=//p')
WANT=${OMNI_RT_TRITON36_VERSION:-3.6.0}
check() {
  PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import sys, torch, triton
assert triton.__version__ == '$WANT', f'triton {triton.__version__} from {triton.__file__}, want $WANT'
assert triton.__file__.startswith('$DIR'), triton.__file__
print('[triton36]', sys.executable, 'torch', torch.__version__, 'from', torch.__file__, '| triton', triton.__version__)"
}
if [ "${1:-}" = "--check" ]; then check; exit; fi
if ! check >/dev/null 2>&1; then
  echo "[triton36] installing triton==$WANT into $DIR"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$DIR" "triton==$WANT"
fi
check
PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q tests/test_kernel_compile.py -p no:cacheprovider
