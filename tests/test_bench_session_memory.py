"""bench/session_memory.py on an exported tiny decoder whose embedding shares the 8-bit LM
head: the Reshape put back reads the same bytes (same logits), and the temporary graph file
is gone afterwards. Seconds."""

from __future__ import annotations

import onnx

from tests.helpers.bench_modules import load_bench_module
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture

session_memory = load_bench_module("session_memory")


def test_the_reshape_form_reads_the_same_bytes_as_the_alias(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    version_dir = tiny_decoders.llama_int4.path
    restored = session_memory.with_reshape_restored(version_dir)
    assert restored is not None
    try:
        graph = onnx.load(str(restored), load_external_data=False).graph
        reshapes = [node for node in graph.node if node.op_type == "Reshape" and node.name.endswith("/BenchReshape")]
        assert len(reshapes) == 1  # the shared embedding's table
        aliased = session_memory._measure(version_dir / session_memory.MODEL_FILE)
        reshaped = session_memory._measure(restored)
    finally:
        restored.unlink(missing_ok=True)
    assert aliased["logits_checksum"] == reshaped["logits_checksum"]
    assert aliased["heap_bytes"] > 0 and aliased["load_s"] > 0
    assert not (version_dir / session_memory.RESHAPE_FILE).exists()
