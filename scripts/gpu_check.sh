#!/usr/bin/env bash
# Exercise CUDA and TensorRT for real on a GPU box and print the figures:
#   1. scripts/gpu_check.py: providers, a CUDA session and its batching gain, TensorRT's engine
#      cache, the appliance's own provider selection, MatMulNBits on the device;
#   2. scripts/gpu_decoder.py run: SmolLM2's int4 CUDA graph, prefill and decode at batch 1-64
#      (only when a prepared decoder is there: GPU_DECODER_DIR, or the bundle's decoder/);
#   3. scripts/gpu_engine.py run: the serving engine on SmolLM2's fp16 CUDA-layout export, 1-32
#      streams (GPU_ENGINE_STATE, or the bundle's engine-state/);
#   4. bench/llm_sampling_kernels.py: the sampling kernel in numpy vs ONNX on CUDA.
# Uses PYTHON (default: the repository's .venv if present, else python3). GPU_BUNDLE=DIR (made
# by scripts/gpu_bundle.sh) installs onnxruntime-gpu and the appliance into a scratch folder
# first, for a box without network. Prints what the box offers first, so a missing GPU build or
# driver is one readable line, not a stack trace.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
echo "== nvidia-smi"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi / no GPU"
echo "== python: $($PYTHON --version 2>&1)"
if [ -n "${GPU_BUNDLE:-}" ]; then
  site="${GPU_SITE:-/tmp/gpu-check-site}"
  rm -rf "$site"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$GPU_BUNDLE"/wheels/*.whl
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  GPU_DECODER_DIR="${GPU_DECODER_DIR:-$GPU_BUNDLE/decoder}"
  echo "== installed the bundle into $site"
fi
# NVIDIA's libraries as pip packages put them (nvidia/*/lib in site-packages, as PyTorch's CUDA
# builds bring them): onnxruntime-gpu's CUDA provider finds them through the loader's path.
nvidia_libs=$("$PYTHON" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
found = []
for root in (spec.submodule_search_locations or []) if spec else []:
    for path, _, files in os.walk(root):
        if os.path.basename(path) == "lib" and any(".so" in name for name in files):
            found.append(path)
print(":".join(sorted(found)))
PY
)
if [ -n "$nvidia_libs" ]; then
  export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== CUDA libraries from pip packages: $(echo "$nvidia_libs" | tr ':' '\n' | wc -l) folders"
fi
missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("onnxruntime", "numpy", "onnx") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "FAIL missing python packages: $missing"
  exit 2
fi
status=0
echo "== checks"
"$PYTHON" scripts/gpu_check.py "$@" || status=$?
if [ -n "${GPU_DECODER_DIR:-}" ] && [ -f "$GPU_DECODER_DIR/reference.json" ]; then
  echo "== decoder (SmolLM2-135M int4, CUDA layout)"
  "$PYTHON" scripts/gpu_decoder.py run "$GPU_DECODER_DIR" --provider "${GPU_DECODER_PROVIDER:-cuda}" \
    --batches "${GPU_DECODER_BATCHES:-1,8,32,64}" || status=$?
fi
engine_state="${GPU_ENGINE_STATE:-${GPU_BUNDLE:+$GPU_BUNDLE/engine-state}}"
if [ -n "$engine_state" ] && [ -f "$engine_state/gpu-engine-record.json" ]; then
  echo "== generation engine (SmolLM2-135M fp16, CUDA layout)"
  "$PYTHON" scripts/gpu_engine.py run "$engine_state" "${GPU_ENGINE_MODEL:-smollm2-gpu}" \
    --streams "${GPU_ENGINE_STREAMS:-1,8,32}" || status=$?
fi
echo "== sampling kernel (median microseconds per call)"
"$PYTHON" bench/llm_sampling_kernels.py --rows 1 8 64 || status=$?
exit "$status"
