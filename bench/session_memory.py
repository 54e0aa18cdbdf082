"""Benchmark: what an exported decoder's ONNX Runtime session holds in memory, and what the
shared embedding's table costs with and without export/llm/initializer_alias.py.

Why: a box serving several models in one memory budget pays for each session's heap, while
weights ONNX Runtime maps from the model's data file are page cache (shared between servers
of the same file, given back under pressure, only the pages touched resident). The export
makes the tied embedding's table a second name for the 8-bit LM head's bytes; before, it was a
Reshape of them that ONNX Runtime folded into a heap copy at load. `--compare-reshape` loads
the version both ways: as exported, and with the Reshape put back (a temporary graph file
beside the same data file; the data is not touched).

Each load runs in a fresh process (one session, one intra-op thread): heap growth (glibc's
mallinfo2), anonymous and file-backed resident growth, load time, and a checksum of the logits
of a fixed prompt (equal both ways: the same bytes are read).

    .venv/bin/python bench/session_memory.py STATE/models/NAME/VERSION --compare-reshape

Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
#: Graph file written beside the data file for the comparison, removed afterwards.
RESHAPE_FILE = "model.reshape-bench.onnx"
MIB = 1 << 20


def measure_in_this_process(model_path: Path) -> dict[str, Any]:
    """Load `model_path`, run one 8-token prompt, report what the load added."""
    import numpy as np
    import onnxruntime as ort
    import psutil

    from appliance.ops.memory import allocated_bytes

    def resident() -> dict[str, int]:
        info = psutil.Process().memory_full_info()
        return {"anon": int(info.rss - info.shared), "file": int(info.shared)}

    heap_before, resident_before = allocated_bytes(), resident()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    started = time.perf_counter()
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    feeds = _feeds(session, model_path.parent, np)
    logits = session.run(["logits"], feeds)[0]
    heap_after, resident_after = allocated_bytes(), resident()
    return {
        "heap_bytes": heap_after - heap_before,
        "resident_anon_bytes": resident_after["anon"] - resident_before["anon"],
        "resident_file_bytes": resident_after["file"] - resident_before["file"],
        "load_s": load_s,
        "logits_checksum": float(np.asarray(logits, dtype=np.float64)[..., :4096].sum()),
    }


def _feeds(session: Any, version_dir: Path, np: Any) -> dict[str, Any]:  # noqa: ANN401 - ort session, numpy module
    """An 8-token prompt with an empty past for every input the decoder graph declares."""
    from appliance.repository.store import read_version

    spec = read_version(version_dir).manifest.generation
    if spec is None:
        raise SystemExit(f"session_memory: {version_dir} is not a text-generation version")
    tokens = 8
    feeds: dict[str, Any] = {}
    for node in session.get_inputs():
        if node.name == "input_ids":
            feeds[node.name] = np.arange(1, tokens + 1, dtype=np.int64)[None, :]
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones((1, tokens), dtype=np.int64)
        elif node.name == "position_ids":
            feeds[node.name] = np.arange(tokens, dtype=np.int64)[None, :]
        elif node.name.startswith("past"):
            dtype = np.float16 if "float16" in node.type else np.float32
            feeds[node.name] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=dtype)
        elif node.name == "logits_start":
            feeds[node.name] = np.zeros((1,), dtype=np.int64)
        else:
            raise SystemExit(f"session_memory: no feed for the decoder input {node.name!r} ({node.type})")
    return feeds


def with_reshape_restored(version_dir: Path) -> Path | None:
    """Write RESHAPE_FILE: the graph with each initializer that shares another's file range
    turned back into a Reshape of it (the form before the alias). None when there is none."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(version_dir / MODEL_FILE), load_external_data=False)
    graph = model.graph
    by_range: dict[tuple[str, ...], onnx.TensorProto] = {}
    restored = 0
    for init in list(graph.initializer):
        key = tuple(f"{entry.key}={entry.value}" for entry in init.external_data)
        if not key:
            continue
        if key not in by_range:
            by_range[key] = init
            continue
        source = by_range[key]
        shape = numpy_helper.from_array(np.asarray(list(init.dims), dtype=np.int64), f"{init.name}/bench_shape")
        graph.initializer.remove(init)
        graph.initializer.append(shape)
        graph.node.insert(0, helper.make_node("Reshape", [source.name, shape.name], [init.name], name=f"{init.name}/BenchReshape"))
        restored += 1
    if not restored:
        return None
    target = version_dir / RESHAPE_FILE
    onnx.save(model, str(target))
    return target


def _measure(model_path: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, "--measure-one", str(model_path)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"session_memory: loading {model_path.name} failed: {completed.stderr.strip().splitlines()[-1:]}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", type=Path, nargs="?", help="an exported version's folder (holds model.onnx)")
    parser.add_argument("--compare-reshape", action="store_true", help="also load the graph with the shared table's Reshape put back")
    parser.add_argument("--repeats", type=int, default=2, help="loads per form (the figures are the last load's; the first warms the page cache)")
    parser.add_argument("--measure-one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.measure_one:
        print(json.dumps(measure_in_this_process(args.measure_one)))
        return
    if args.version_dir is None or not (args.version_dir / MODEL_FILE).is_file():
        parser.error(f"version_dir must be a folder holding {MODEL_FILE}")
    forms = {"as exported": args.version_dir / MODEL_FILE}
    restored = with_reshape_restored(args.version_dir) if args.compare_reshape else None
    if args.compare_reshape and restored is None:
        print("no initializer shares another's bytes in this version: nothing to compare")
    if restored is not None:
        forms["reshape put back"] = restored
    try:
        report = {name: [_measure(path) for _ in range(max(args.repeats, 1))][-1] for name, path in forms.items()}
    finally:
        if restored is not None:
            restored.unlink(missing_ok=True)
    for name, figures in report.items():
        print(
            f"{name:17s}: heap {figures['heap_bytes'] / MIB:7.0f} MiB, resident anonymous {figures['resident_anon_bytes'] / MIB:7.0f} MiB, "
            f"file-backed {figures['resident_file_bytes'] / MIB:6.0f} MiB, load {figures['load_s']:.1f} s, logits checksum {figures['logits_checksum']:.6g}"
        )
    if args.json:
        args.json.write_text(json.dumps({"version_dir": str(args.version_dir), "forms": report}, indent=2))


if __name__ == "__main__":
    main()
