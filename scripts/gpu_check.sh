#!/usr/bin/env bash
# Exercise CUDA and TensorRT for real on a GPU box and print the figures (scripts/gpu_check.py).
# Uses PYTHON (default: the repository's .venv if present, else python3). Prints what the box
# offers first, so a missing GPU build or driver is one readable line, not a stack trace.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
echo "== nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi / no GPU"
echo "== python: $($PYTHON --version 2>&1)"
missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("onnxruntime", "numpy", "onnx") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "FAIL missing python packages: $missing"
  exit 2
fi
echo "== checks"
exec "$PYTHON" scripts/gpu_check.py "$@"
