"""Benchmark: which KV cache precision ONNX Runtime's CPU attention runs well, and what an
int8 cache costs in quality (issue 18, "measure what 1.32 supports before choosing").

Two parts, one invocation:

1. Speed of GroupQueryAttention alone (com.microsoft, the operator the model builder's graphs
   use) with fp32 activations and an fp32, fp16 or int8 (per-tensor and per-channel) cache, at
   a model's attention shape (default Qwen2.5-0.5B: 14 heads, 2 KV heads, head size 64), for
   decode steps of 1, 8 and 32 rows and 256-token prefill chunks at several past lengths; past
   and present bound to one
   preallocated buffer as the engine binds them. Median of `--repeats` timed runs after a
   warm-up, per layer.
2. Quality (`--version DIR`, a published decoder version folder with an fp32 cache): the
   export's own int8 calibration (export/llm/kv_quant.py) on the shipped chat prompts, then
   perplexity on the shipped prose with each cache, next-token agreement, and 64-token greedy
   agreement on the prompts, int8 cache against fp32 cache with the same weights.

Prints a table; `--json FILE` keeps the figures. Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
CACHE_TYPES: dict[str, tuple[int, type[np.generic], str | None]] = {
    "fp32": (TensorProto.FLOAT, np.float32, None),
    "fp16": (TensorProto.FLOAT16, np.float16, None),
    "int8 per tensor": (TensorProto.INT8, np.int8, "PER_TENSOR"),
    "int8 per channel": (TensorProto.INT8, np.int8, "PER_CHANNEL"),
}
#: (rows, new tokens per row, past tokens) of the runs timed: decode steps, then prefill chunks
#: of the engine's default 256 tokens.
STEPS = ((1, 1, 100), (1, 1, 2000), (8, 1, 2000), (32, 1, 500), (1, 256, 0), (1, 256, 1024), (1, 256, 1744))
GREEDY_TOKENS = 64


def attention_graph(heads: int, kv_heads: int, head_dim: int, cache: str) -> bytes:
    element, _, quant = CACHE_TYPES[cache]
    hidden, kv_hidden = heads * head_dim, kv_heads * head_dim
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [None, None, hidden]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [None, None, kv_hidden]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [None, None, kv_hidden]),
        helper.make_tensor_value_info("past_k", element, [None, kv_heads, None, head_dim]),
        helper.make_tensor_value_info("past_v", element, [None, kv_heads, None, head_dim]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [None]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    names = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"]
    initializers = []
    attributes: dict[str, Any] = {}
    if quant is not None:
        scales = 1 if quant == "PER_TENSOR" else kv_hidden
        names += ["", "", "", "", "", "k_scale", "v_scale"]
        initializers = [helper.make_tensor(name, TensorProto.FLOAT, [scales], [0.05] * scales) for name in ("k_scale", "v_scale")]
        attributes = {"k_quant_type": quant, "v_quant_type": quant, "kv_cache_bit_width": 8}
    node = helper.make_node(
        "GroupQueryAttention", names, ["out", "present_k", "present_v"], domain="com.microsoft",
        num_heads=heads, kv_num_heads=kv_heads, **attributes,
    )
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("present_k", element, None),
        helper.make_tensor_value_info("present_v", element, None),
    ]
    graph = helper.make_graph([node], "attention", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def time_attention(args: argparse.Namespace) -> list[dict[str, Any]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rng = np.random.default_rng(0)
    rows_out: list[dict[str, Any]] = []
    max_len = max(past + new for _, new, past in STEPS) + 16
    for rows, new, past in STEPS:
        q = rng.standard_normal((rows, new, args.heads * args.head_dim)).astype(np.float32)
        k = rng.standard_normal((rows, new, args.kv_heads * args.head_dim)).astype(np.float32)
        v = rng.standard_normal((rows, new, args.kv_heads * args.head_dim)).astype(np.float32)
        values = rng.standard_normal((rows, args.kv_heads, max_len, args.head_dim)).astype(np.float32)
        for cache, (_, dtype, quant) in CACHE_TYPES.items():
            session = ort.InferenceSession(attention_graph(args.heads, args.kv_heads, args.head_dim, cache), options, providers=["CPUExecutionProvider"])
            stored = np.clip(np.round(values / 0.05), -127, 127).astype(dtype) if quant else values.astype(dtype)
            keys, vals = stored.copy(), stored.copy()
            binding = session.io_binding()
            for name, array in (("q", q), ("k", k), ("v", v), ("past_k", keys), ("past_v", vals)):
                binding.bind_cpu_input(name, array)
            binding.bind_cpu_input("seqlens_k", np.full(rows, past + new - 1, np.int32))
            binding.bind_cpu_input("total", np.array(past + new, np.int32))
            binding.bind_output("out")
            binding.bind_output("present_k", "cpu", 0, dtype, keys.shape, keys.ctypes.data)
            binding.bind_output("present_v", "cpu", 0, dtype, vals.shape, vals.ctypes.data)
            for _ in range(3):
                session.run_with_iobinding(binding)
            samples = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                session.run_with_iobinding(binding)
                samples.append(time.perf_counter() - started)
            rows_out.append(
                {"rows": rows, "new": new, "past": past, "cache": cache, "ms_per_layer": round(statistics.median(samples) * 1000, 4)}
            )
    return rows_out


def quality(version_dir: Path, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from appliance.export.tasks.base import DATA_DIR
    from appliance.export.llm import kv_quant
    from appliance.export.llm.eval_data import TokenizerFile, load_prompts, load_prose, render_chat
    from appliance.export.llm.onnx_decoder import OnnxDecoder
    from appliance.repository.manifest import Manifest

    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_text())
    spec = manifest.generation
    assert spec is not None and spec.kv_datatype == "FP32", "give a version with an fp32 KV cache"
    tokenizer = TokenizerFile(version_dir / "tokenizer.json")
    config = json.loads((version_dir / "tokenizer_config.json").read_text())
    special = {key: (value.get("content") if isinstance(value, dict) else value) for key, value in config.items() if key.endswith("_token")}
    prompts = [
        tokenizer.encode(render_chat(manifest.chat_template, prompt.messages, special), add_special_tokens=False)
        for prompt in load_prompts(DATA_DIR)
    ]
    prose = tokenizer.encode(load_prose(DATA_DIR))
    fp32 = OnnxDecoder(version_dir / manifest.model_file, spec, threads)
    scales = kv_quant.calibrate(fp32, prompts)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / manifest.model_file
        int8 = OnnxDecoder(target, kv_quant.write_int8_kv(version_dir / manifest.model_file, target, spec, scales), threads)
        comparison = kv_quant.compare_caches(fp32, int8, prose)
        matched = []
        for ids in prompts:
            a, b = fp32.greedy(ids, GREEDY_TOKENS), int8.greedy(ids, GREEDY_TOKENS)
            matched.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), GREEDY_TOKENS))
    return {
        "model": manifest.name,
        "variant": manifest.quantization,
        "perplexity_fp32_cache": round(comparison.perplexity_fp32, 4),
        "perplexity_int8_cache": round(comparison.perplexity_int8, 4),
        "perplexity_increase": round(comparison.increase, 5),
        "next_token_agreement": round(comparison.top1_agreement, 4),
        "greedy_agreement_64": round(float(np.mean(matched)) / GREEDY_TOKENS, 4),
        "greedy_identical_64": f"{sum(m == GREEDY_TOKENS for m in matched)}/{len(matched)}",
        "bytes_per_token_fp32": 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4,
        "bytes_per_token_int8": 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--version", type=Path, help="a published decoder version folder (fp32 KV cache) for the quality part")
    parser.add_argument("--quality-only", action="store_true", help="skip the timing part (it needs a quiet machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures: dict[str, Any] = {"onnxruntime": ort.__version__, "speed": [] if args.quality_only else time_attention(args)}
    if figures["speed"]:
        print(f"GroupQueryAttention, {args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, {args.threads} threads, ms per layer:")
    for rows, new, past in STEPS if figures["speed"] else ():
        cells = [
            f"{row['cache']} {row['ms_per_layer']:.3f}"
            for row in figures["speed"] if (row["rows"], row["new"], row["past"]) == (rows, new, past)
        ]
        print(f"  {rows:>2} rows x {new:>3} new x {past:>4} past: " + " | ".join(cells))
    if args.version is not None:
        figures["quality"] = quality(args.version, args.threads)
        print(json.dumps(figures["quality"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
