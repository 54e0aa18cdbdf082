"""`--kv-cache int8`: what the export writes and chooses, and what it refuses. The engine paths
over an int8 cache (batching, chunked prefill, prefix cache, speculation) are the engine tests
run on the same tiny model (tests/test_generation_engine.py, `llama_int4_kv8`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from appliance.config import load_settings
from appliance.errors import ExportError
from appliance.export.llm.kv_prefill import FP32_ATTENTION_INPUT
from appliance.export.pipeline import ExportRequest, run_export
from appliance.export.tasks import text_generation
from appliance.repository import ModelRepository
from tests.helpers.decoders import make_tiny_llama
from tests.helpers.generation import TinyDecoders, make_engine, tiny_decoders  # noqa: F401 - fixture


def test_the_int8_cache_is_written_into_the_graph_and_reported(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    version = tiny_decoders.llama_int4_kv8
    spec = version.manifest.generation
    assert spec is not None and spec.kv_datatype == "INT8"
    assert spec.fp32_attention_input == FP32_ATTENTION_INPUT
    graph = onnx.load(str(version.model_path), load_external_data=False).graph
    assert not [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    branches = [node for node in graph.node if node.op_type == "If" and node.input[0] == FP32_ATTENTION_INPUT]
    assert len(branches) == spec.num_layers
    for node in branches:
        subgraphs = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        (decode,) = [n for n in subgraphs["else_branch"].node if n.op_type == "GroupQueryAttention"]
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in decode.attribute}
        assert attributes["k_quant_type"] == b"PER_CHANNEL" and attributes["kv_cache_bit_width"] == 8
        (prefill,) = [n for n in subgraphs["then_branch"].node if n.op_type == "GroupQueryAttention"]
        assert not {attribute.name for attribute in prefill.attribute} & {"k_quant_type", "v_quant_type", "kv_cache_bit_width"}
    cache_inputs = [value for value in graph.input if value.name.startswith("past_key_values.")]
    assert cache_inputs and all(value.type.tensor_type.elem_type == onnx.TensorProto.INT8 for value in cache_inputs)
    report = version.report
    assert report is not None
    kv = report.details["kv_cache"]
    assert kv["datatype"] == "INT8" and kv["bytes_per_token"] * 4 == kv["bytes_per_token_fp32"]
    assert abs(kv["perplexity_increase"]) <= text_generation.KV_CACHE_BUDGET
    assert 0 < kv["next_token_agreement"] <= 1
    assert any("KV cache int8" in note for note in report.notes)


def test_the_engine_holds_a_quarter_of_the_fp32_cache_bytes(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    int8 = make_engine(tiny_decoders.llama_int4_kv8)
    fp32 = make_engine(tiny_decoders.llama_int4)
    try:
        assert int8.kv_store.keys[0].dtype == np.int8
        assert int8.kv.bytes_per_token * 4 == fp32.kv.bytes_per_token
    finally:
        int8.stop()
        fp32.stop()


def test_fp32_is_the_default_cache(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    report = tiny_decoders.llama_int4.report
    assert report is not None and report.details["kv_cache"]["datatype"] == "FP32"
    assert tiny_decoders.llama_int4.manifest.generation.kv_datatype == "FP32"  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("kv8") / "llama")


def test_a_cache_over_its_quality_budget_stays_fp32_and_says_why(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_generation, "KV_CACHE_BUDGET", -1.0)  # no int8 cache can pass
    version = run_export(
        ExportRequest(source=str(llama_dir), name="tiny", task="text-generation", quant="int4", kv_cache="int8"),
        load_settings(state_dir=tmp_path),
    ).version
    assert version.manifest.generation is not None and version.manifest.generation.kv_datatype == "FP32"
    assert version.report is not None and version.report.details["kv_cache"]["datatype"] == "FP32"
    assert any("KV cache kept fp32" in note for note in version.report.notes)


@pytest.mark.parametrize(
    ("quant", "task", "words"),
    [("fp32", "text-generation", "int4 / int8 / int4-exact variants"), ("fp16", "text-generation", "not to text-generation fp16")],
)
def test_int8_cache_is_refused_for_variants_that_cannot_carry_it(
    llama_dir: Path, tmp_path: Path, quant: str, task: str, words: str
) -> None:
    settings = load_settings(state_dir=tmp_path)
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(llama_dir), name="tiny", task=task, quant=quant, kv_cache="int8"), settings)
    assert caught.value.field == "kv_cache" and words in str(caught.value)
    assert ModelRepository(settings.models_dir).names() == []


def test_an_unknown_cache_type_is_refused_before_any_work(llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(llama_dir), name="tiny", kv_cache="fp8"), load_settings(state_dir=tmp_path))
    assert caught.value.field == "kv_cache" and "fp32, int8" in str(caught.value)
