#!/usr/bin/env bash
# One command for a lent GPU machine: `make gpu-check REPORT=dir` (or scripts/gpu_check.sh --report dir).
# The machine is offline and has its own Python/torch/triton: keep them, install nothing from the network
# (only wheels carried in the tree under wheels/, --no-index), build omni_rt._C, run the GPU tests, the kernel
# benchmarks and the end-to-end benchmark at full size with synthetic weights, and write everything to DIR.
# --dry-run checks that it would start (CI runs this) without touching a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=benchmarks/results/latest
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --report) REPORT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 [--report DIR] [--dry-run]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

run() {  # run a step, log it, keep going on failure (the report says what failed)
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$REPORT/steps.log"
  if [ "$DRY" = 1 ]; then return 0; fi
  local start=$(date +%s)
  "$@" > "$REPORT/$name.log" 2>&1
  local rc=$?
  echo "   -> rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$REPORT/steps.log"
  tail -n 5 "$REPORT/$name.log"
  return 0
}

if [ "$DRY" = 1 ]; then
  REPORT=$(mktemp -d)
  $PY -c "import torch, triton, omni_rt, omni_rt.kernels; print('[gpu-check dry-run] torch', torch.__version__, 'triton', triton.__version__)" || exit 1
  for f in scripts/install.sh benchmarks tests/conftest.py; do [ -e "$f" ] || { echo "missing $f"; exit 1; }; done
fi
mkdir -p "$REPORT"
: > "$REPORT/steps.log"

if [ "$DRY" = 0 ]; then
  $PY - > "$REPORT/env.txt" 2>&1 <<'PYEOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF
  nvidia-smi >> "$REPORT/env.txt" 2>&1 || true
  cat "$REPORT/env.txt"
fi

if ls wheels/*.whl >/dev/null 2>&1; then
  run wheels $PY -m pip install -q --no-index --no-deps wheels/*.whl
fi
run build $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
run gpu_tests $PY -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$REPORT/gpu_tests.xml"
run kernel_bench $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$REPORT/bench.json"
run e2e_bench $PY -m omni_rt bench --synthetic full --concurrency 1,4,6 --json "$REPORT/e2e.json"
# Graphs are loud: every graphed stage must replay a captured graph; an eager fallback fails the check.
GRAPHS_RC=0
if [ "$DRY" = 0 ]; then
  $PY - > "$REPORT/graphs.txt" 2>&1 <<'PYEOF'
import sys, torch, omni_rt
from omni_rt.testing import build_synthetic_model
model = build_synthetic_model("tiny", torch.bfloat16, "cuda")
with omni_rt.Runtime(model, device="cuda", max_batch_size=4) as rt:
    report = rt.engine.stages.graph_report()
    print("graph replay per stage:", report)
sys.exit(0 if report and all(report.values()) else 1)
PYEOF
  GRAPHS_RC=$?
  cat "$REPORT/graphs.txt"
  [ "$GRAPHS_RC" = 0 ] || echo "FAIL: a stage fell back to eager (see graphs.txt)" | tee -a "$REPORT/steps.log"
fi
echo "report in $REPORT" | tee -a "$REPORT/steps.log"
if [ "$DRY" = 1 ]; then echo "[gpu-check dry-run] ok: would run the steps above"; rm -rf "$REPORT"; fi
exit "$GRAPHS_RC"
