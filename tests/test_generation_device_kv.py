"""The GPU KV store and the placement decision, on a box without a GPU.

`DeviceKvStore` keeps the cache in ONNX Runtime buffers bound by address; here those buffers are
OrtValues in host memory and `HostMemory` stands in for the CUDA runtime's copies (named as the
fake it is), so everything but the device itself runs for real: the address arithmetic of a
slot range, compaction moves, prefix-cache saves and restores, speculative verification. The
engine must give the same tokens with it as with the host store and as the plain reference loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from appliance.generation.device_kv import DeviceKvStore, HostMemory, fit_context
from appliance.generation.model_runner import KvGeometry, KvStore
from appliance.generation.placement import Placement, open_placed_decoder
from appliance.generation.prefix_cache import BLOCK_TOKENS
from tests.helpers.generation import (  # noqa: F401 - tiny_decoders is a fixture
    PROMPTS,
    TinyDecoders,
    generate,
    greedy,
    make_engine,
    reference_greedy,
    tiny_decoders,
)

ON_DEVICE_BUFFERS = Placement(device_store=True)


def _stores(dtype: type[np.floating]) -> tuple[KvStore, DeviceKvStore]:
    geometry = KvGeometry(num_layers=2, num_kv_heads=3, head_dim=4, dtype=np.dtype(dtype))
    return KvStore(geometry, 4, 16), DeviceKvStore(geometry, 4, 16, device="cpu", device_id=0, memory=HostMemory())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_store_saves_restores_and_moves_like_the_host_store(dtype: type[np.floating]) -> None:
    host, device = _stores(dtype)
    rng = np.random.default_rng(0)
    saved = [rng.standard_normal((3, 10, 4)).astype(dtype) for _ in range(4)]
    for store in (host, device):
        store.write(1, saved, 7)
        store.write(2, [part + 1 for part in saved], 10)
        store.move_slot(2, 0, 5)
    for slot, length in ((1, 7), (0, 5), (2, 10)):
        got, want = device.read(slot, length), host.read(slot, length)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(np.array_equal(part, whole[:, :7]) for part, whole in zip(device.read(1, 7), saved, strict=True))
    assert [part.shape for part in device.read(3, 0)] == [(3, 0, 4)] * 4
    assert device.nbytes == host.nbytes


def test_device_store_binds_a_slot_range_by_address() -> None:
    geometry = KvGeometry(num_layers=1, num_kv_heads=3, head_dim=4, dtype=np.dtype(np.float32))
    device = DeviceKvStore(geometry, 4, 16, device="cpu", device_id=0, memory=HostMemory())
    for slot in range(4):
        device.write(slot, [np.full((3, 16, 4), 10.0 * slot + 1), np.full((3, 16, 4), 10.0 * slot + 2)], 16)
    session = ort.InferenceSession(_identity_model(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    device.bind(binding, [("past.0", "present.0")], [("past.1", "present.1")], 2, 2)  # K and V of slots 2-3
    binding.bind_output("out", "cpu")
    session.run_with_iobinding(binding)
    out = binding.copy_outputs_to_cpu()[-1]
    # out = K + V over slots 2 and 3 only: 21 + 22 and 31 + 32.
    assert out.shape == (2, 3, 16, 4) and np.all(out[0] == 43.0) and np.all(out[1] == 63.0)


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    shape = ["rows", 3, 16, 4]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["past.0", "past.1"], ["out"]),
            helper.make_node("Identity", ["past.0"], ["present.0"]),
            helper.make_node("Identity", ["past.1"], ["present.1"]),
        ],
        "bind",
        [helper.make_tensor_value_info(f"past.{i}", TensorProto.FLOAT, shape) for i in range(2)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("out", "present.0", "present.1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_batched_sequences_on_device_buffers_equal_the_reference(tiny_decoders: TinyDecoders, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_decoders.llama_fp32
    moves: list[tuple[int, int, int]] = []
    real_move = DeviceKvStore.move_slot
    monkeypatch.setattr(DeviceKvStore, "move_slot", lambda self, *args: (moves.append(args), real_move(self, *args))[1])
    engine = make_engine(model, placement=ON_DEVICE_BUFFERS)
    try:
        assert isinstance(engine.kv_store, DeviceKvStore)

        async def together() -> list[list[int]]:
            # Sequences leave at different steps: the survivors are moved down (compaction).
            results = await asyncio.gather(*[generate(engine, prompt, greedy(10 + 5 * i)) for i, prompt in enumerate(PROMPTS)])
            return [result.tokens for result in results]

        assert asyncio.run(together()) == [reference_greedy(model, prompt, 10 + 5 * i) for i, prompt in enumerate(PROMPTS)]
        assert moves  # a sequence was moved down while others still ran
    finally:
        engine.stop()


def test_prefix_cache_and_prompt_lookup_on_device_buffers(tiny_decoders: TinyDecoders) -> None:
    model = tiny_decoders.llama_fp32
    system = [(3 * i + 2) % 300 + 3 for i in range(3 * BLOCK_TOKENS)]
    engine = make_engine(model, placement=ON_DEVICE_BUFFERS, speculative="prompt-lookup")
    try:
        first, second = system + [40, 41, 42], system + [50, 51]
        assert asyncio.run(generate(engine, first, greedy(8))).tokens == reference_greedy(model, first, 8)
        result = asyncio.run(generate(engine, second, greedy(8)))
        assert result.tokens == reference_greedy(model, second, 8)
        assert result.events[-1].cached_prompt_tokens == 3 * BLOCK_TOKENS
        repeating = [7, 8, 9, 10, 11, 12] * 6
        assert asyncio.run(generate(engine, repeating, greedy(24))).tokens == reference_greedy(model, repeating, 24)
    finally:
        engine.stop()


def test_the_fp16_cuda_layout_serves_on_the_cpu_with_its_reference_output(tiny_decoders: TinyDecoders) -> None:
    model = tiny_decoders.llama_fp16
    assert model.manifest.generation is not None and model.manifest.generation.kv_datatype == "FP16"
    for placement in (None, ON_DEVICE_BUFFERS):
        engine = make_engine(model, placement=placement)
        try:
            for prompt in PROMPTS[:2]:
                assert asyncio.run(generate(engine, prompt, greedy(12))).tokens == reference_greedy(model, prompt, 12)
        finally:
            engine.stop()


def test_placement_stays_on_the_cpu_without_cuda_or_when_asked(tiny_decoders: TinyDecoders) -> None:
    model = tiny_decoders.llama_fp16
    spec = model.manifest.generation
    assert spec is not None
    for choice in ("cpu", "auto"):
        _, placement = open_placed_decoder(model.model_path, spec, choice=choice, device_id=0, threads=1, takes_turns=False)
        assert placement == Placement()  # this box's onnxruntime has no CUDA provider


def test_with_cuda_listed_a_cpu_layout_graph_stays_on_the_cpu_and_says_why(tiny_decoders: TinyDecoders, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake: a CUDA build's provider list on a box without a GPU (the decision, not the device).
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    fp32, fp16 = tiny_decoders.llama_fp32, tiny_decoders.llama_fp16
    assert fp32.manifest.generation is not None and fp16.manifest.generation is not None
    _, placement = open_placed_decoder(fp32.model_path, fp32.manifest.generation, choice="auto", device_id=0, threads=1, takes_turns=False)
    assert placement.device == "cpu" and placement.note is not None and "--quant fp16" in placement.note
    _, placement = open_placed_decoder(fp16.model_path, fp16.manifest.generation, choice="auto", device_id=0, threads=1, takes_turns=False)
    assert placement.device == "cpu" and placement.note is not None and "CUDA provider did not load" in placement.note


def test_the_context_shrinks_to_what_the_device_memory_holds() -> None:
    geometry = KvGeometry(num_layers=30, num_kv_heads=3, head_dim=64, dtype=np.dtype(np.float16))  # SmolLM2
    per_token = geometry.bytes_per_token  # 23,040 bytes
    assert fit_context(geometry, 16, 8192, None, 0.6) == 8192
    assert fit_context(geometry, 16, 8192, 80 << 30, 0.6) == 8192
    assert fit_context(geometry, 16, 8192, 1 << 30, 0.6) == int((1 << 30) * 0.6) // (16 * per_token)


def test_a_device_path_that_fails_its_load_check_serves_on_the_cpu_instead(tiny_decoders: TinyDecoders, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy routine that copies nothing: what a wrong runtime binding would look like.
    monkeypatch.setattr(HostMemory, "copy_rows", lambda self, *args: None)
    model = tiny_decoders.llama_fp32
    engine = make_engine(model, placement=ON_DEVICE_BUFFERS)
    try:
        assert isinstance(engine.kv_store, KvStore)
        assert engine.placement.device == "cpu" and engine.placement.note is not None and "load check" in engine.placement.note
        assert asyncio.run(generate(engine, PROMPTS[0], greedy(8))).tokens == reference_greedy(model, PROMPTS[0], 8)
    finally:
        engine.stop()


def test_a_binding_that_misses_the_slot_offset_fails_the_load_check(tiny_decoders: TinyDecoders, monkeypatch: pytest.MonkeyPatch) -> None:
    real_bind = DeviceKvStore.bind
    monkeypatch.setattr(DeviceKvStore, "bind", lambda self, binding, keys, values, first, rows: real_bind(self, binding, keys, values, 0, rows))
    engine = make_engine(tiny_decoders.llama_fp32, placement=ON_DEVICE_BUFFERS)
    try:
        assert isinstance(engine.kv_store, KvStore)
        assert engine.placement.note is not None and "disagrees" in engine.placement.note
    finally:
        engine.stop()
