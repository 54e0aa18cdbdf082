"""Text-generation export end to end on tiny random decoders: a Llama through the model
builder (fp32, int8, int4), a GPT-2 through Optimum, and a GGUF file; every version is
published and its manifest alone is enough to run a greedy loop with the KV cache."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from helpers.decoders import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, make_tiny_gpt2, make_tiny_llama, write_tiny_gguf

from appliance.config import Settings, load_settings
from appliance.errors import ExportError
from appliance.export.llm.onnx_decoder import OnnxDecoder
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository import ModelRepository, ModelVersion


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decoders")
    make_tiny_llama(root / "llama")
    make_tiny_gpt2(root / "gpt2")
    write_tiny_gguf(root / "llama", root / "tiny.gguf")
    return root


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(state_dir=tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def llama_versions(models_dir: Path, settings: Settings) -> dict[str, ModelVersion]:
    versions: dict[str, ModelVersion] = {}
    for quant in ("fp32", "int8", "int4"):
        result = run_export(ExportRequest(source=str(models_dir / "llama"), name="tiny-llama", quant=quant), settings)
        versions[quant] = result.version
    return versions


def _decoder(version: ModelVersion) -> OnnxDecoder:
    assert version.manifest.generation is not None
    return OnnxDecoder(version.model_path, version.manifest.generation)


def test_every_variant_is_published_with_a_complete_generation_manifest(llama_versions: dict[str, ModelVersion]) -> None:
    for quant, version in llama_versions.items():
        manifest = version.manifest
        assert manifest.task == "text-generation" and manifest.quantization == quant
        spec = manifest.generation
        assert spec is not None
        assert (spec.graph, spec.num_layers, spec.num_kv_heads, spec.head_dim) == ("genai", 2, 2, 16)
        assert spec.vocab_size == 320 and spec.context_length == 256
        assert spec.eos_token_ids == [2] and spec.bos_token_id == 1
        assert spec.defaults == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
        assert manifest.chat_template == CHAT_TEMPLATE
        files = {path.name for path in version.path.iterdir()}
        assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "genai_config.json"} <= files
        assert version.report is not None and version.report.verdict == "accepted"


def test_kv_tensor_names_in_the_manifest_are_the_graphs_own(llama_versions: dict[str, ModelVersion]) -> None:
    manifest = llama_versions["int4"].manifest
    spec = manifest.generation
    assert spec is not None
    inputs = {tensor.name for tensor in manifest.inputs}
    outputs = {tensor.name for tensor in manifest.outputs}
    for layer in range(spec.num_layers):
        assert spec.past_key_name.format(layer=layer) in inputs
        assert spec.past_value_name.format(layer=layer) in inputs
        assert spec.present_key_name.format(layer=layer) in outputs
        assert spec.present_value_name.format(layer=layer) in outputs
    assert {"input_ids", "attention_mask"} <= inputs and "logits" in outputs


def test_tokenizer_spec_names_the_models_special_tokens(llama_versions: dict[str, ModelVersion]) -> None:
    tokenizer = llama_versions["int8"].manifest.tokenizer
    assert tokenizer is not None
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.add_bos_token) == (IM_START, IM_END, False)
    assert tokenizer.pad_token_id == 2 and tokenizer.max_length == 256


def test_fp32_export_matches_pytorch_logits_and_greedy_output(llama_versions: dict[str, ModelVersion]) -> None:
    report = llama_versions["fp32"].report
    assert report is not None
    assert report.quality["logits_max_abs_diff"] < 1e-3
    assert report.quality["greedy_identical_64"] == "8/8"
    assert report.quality["perplexity"] == pytest.approx(report.quality["torch_perplexity"], rel=1e-4)


def test_quantised_variants_report_quality_against_the_fp32_export(llama_versions: dict[str, ModelVersion]) -> None:
    for quant, budget in (("int8", 0.01), ("int4", 0.10)):
        report = llama_versions[quant].report
        assert report is not None
        quality = report.quality
        assert {"perplexity", "reference_perplexity", "torch_perplexity", "greedy_agreement"} <= set(quality)
        assert 0.0 <= quality["greedy_agreement"] <= 1.0
        assert report.budget["max_loss"] == budget
        expected_loss = max(0.0, quality["perplexity"] / quality["reference_perplexity"] - 1)
        assert report.budget["loss"] == pytest.approx(expected_loss, abs=1e-4)
        assert quality["reference_greedy_identical_64"] == "8/8"


def test_int4_uses_matmulnbits_and_is_the_smallest(llama_versions: dict[str, ModelVersion]) -> None:
    sizes = {quant: version.size_bytes for quant, version in llama_versions.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    report = llama_versions["int4"].report
    assert report is not None
    assert report.details["ops"]["MatMulNBits"] >= 1 and report.details["embedding_shared_with_lm_head"] is True
    assert "MatMulNBits" in llama_versions["int4"].manifest.providers.contrib_ops
    assert report.latency["decode_step_ms"] > 0


def test_greedy_loop_runs_from_the_published_version_alone(llama_versions: dict[str, ModelVersion]) -> None:
    from tokenizers import Tokenizer

    version = llama_versions["int4"]
    tokenizer = Tokenizer.from_file(str(version.path / "tokenizer.json"))
    prompt = tokenizer.encode("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    spec = version.manifest.generation
    assert spec is not None
    tokens = _decoder(version).greedy(prompt, 20, stop_ids=set(spec.eos_token_ids))
    assert 1 <= len(tokens) <= 20
    assert all(0 <= token < spec.vocab_size for token in tokens)


def test_decode_with_kv_cache_equals_full_recompute(llama_versions: dict[str, ModelVersion]) -> None:
    decoder = _decoder(llama_versions["fp32"])
    prompt = [5, 6, 7, 8, 9, 10]
    tokens = decoder.greedy(prompt, 8)
    full = decoder.logits(prompt + tokens[:-1])
    assert [int(np.argmax(row)) for row in full[len(prompt) - 1 :]] == tokens


def test_auto_for_a_gpu_is_the_builders_half_precision_graph(models_dir: Path, settings: Settings) -> None:
    # `--quant auto` on a GPU box: the CUDA layout the engine decodes on the GPU (placement.py).
    version = run_export(ExportRequest(source=str(models_dir / "llama"), name="tiny-llama-gpu", provider="cuda"), settings).version
    spec = version.manifest.generation
    assert spec is not None and spec.kv_datatype == "FP16"
    assert version.manifest.quantization == "fp16"
    assert version.report is not None and version.report.quality["greedy_agreement"] > 0.5
    tokens = _decoder(version).greedy([5, 6, 7, 8], 4)
    assert len(tokens) == 4


def test_gpt2_exports_through_optimum(models_dir: Path, settings: Settings) -> None:
    version = run_export(ExportRequest(source=str(models_dir / "gpt2"), name="tiny-gpt2", quant="fp32"), settings).version
    spec = version.manifest.generation
    assert spec is not None and spec.graph == "optimum"
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 16)
    assert spec.eos_token_ids == [0]
    assert version.manifest.tokenizer is not None and version.manifest.tokenizer.eos_token == ENDOFTEXT
    assert version.report is not None and version.report.quality["greedy_identical_64"] == "8/8"
    assert version.report.quality["logits_max_abs_diff"] < 1e-3


def test_gpt2_int8_unties_the_lm_head_to_quantise_it(models_dir: Path, settings: Settings) -> None:
    version = run_export(ExportRequest(source=str(models_dir / "gpt2"), name="tiny-gpt2", quant="int8"), settings).version
    report = version.report
    assert report is not None and report.details["untied"]
    assert report.details["ops"]["MatMulNBits"] >= 1


def test_gguf_file_exports_with_the_gguf_special_tokens(models_dir: Path, settings: Settings) -> None:
    version = run_export(ExportRequest(source=str(models_dir / "tiny.gguf"), name="tiny-gguf", quant="int4"), settings).version
    manifest = version.manifest
    assert manifest.source.kind == "gguf"
    assert manifest.tokenizer is not None and manifest.tokenizer.eos_token == IM_END
    assert manifest.tokenizer.add_bos_token is False
    assert manifest.generation is not None and manifest.generation.eos_token_ids == [2]
    assert manifest.chat_template == CHAT_TEMPLATE
    config = json.loads((version.path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == IM_END


def test_a_given_quality_budget_replaces_the_variant_default(models_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    request = ExportRequest(source=str(models_dir / "llama"), name="strict", quant="int4", max_quality_loss=0.0)
    version = run_export(request, settings).version
    report = version.report
    assert report is not None
    assert report.budget["max_loss"] == 0.0 and report.budget["from"] == "--max-quality-loss"
    assert (report.verdict == "rejected") == (report.budget["loss"] > 0)
    assert version.manifest.deployable == (report.verdict == "accepted")


def test_quantisation_that_does_not_fit_the_task_is_refused(models_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(models_dir / "llama"), name="x", quant="int8-static"), settings)
    assert caught.value.field == "quant"
    assert ModelRepository(settings.models_dir).names() == []


def test_unsupported_decoder_architecture_is_named(models_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(models_dir / "gpt2", folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    settings = load_settings(state_dir=tmp_path / "state")
    with pytest.raises(ExportError, match="MambaForCausalLM is not supported.*LlamaForCausalLM"):
        run_export(ExportRequest(source=str(folder), name="odd", task="text-generation", quant="fp32"), settings)


def test_model_builder_opens_no_network_connection(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.export.llm.routes import build_genai

    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network use during export")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = build_genai(models_dir / "llama", tmp_path / "out", tmp_path / "cache")
    assert model.is_file() and attempts == []


def test_onnx_runtime_and_genai_keep_no_telemetry_store_under_the_offline_flags(
    llama_versions: dict[str, ModelVersion], tmp_path: Path
) -> None:
    import subprocess
    import sys

    code = (
        "from appliance.offline import enforce_offline\n"
        "enforce_offline()\n"
        "import sys, onnxruntime, onnxruntime_genai as og\n"
        "onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "og.Model(sys.argv[2])\n"
    )
    version = llama_versions["int4"]
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(version.model_path), str(version.path)], check=True, env=env)
    assert [str(path.relative_to(home)) for path in home.rglob("*")] == []


def test_logits_start_runs_the_lm_head_on_the_last_position_only(llama_versions: dict[str, ModelVersion]) -> None:
    from appliance.generation.model_runner import KvGeometry, KvStore, SharedBufferRunner, open_decoder_session

    for name, tolerance in (("fp32", 1e-5), ("int4", 2e-2)):
        version = llama_versions[name]
        spec = version.manifest.generation
        assert spec is not None and spec.logits_start_input == "logits_start"
        listed = {tensor.name: tensor for tensor in version.manifest.inputs}
        assert listed["logits_start"].datatype == "INT64" and listed["logits_start"].shape == [1]
        prompt = np.asarray([[5, 6, 7, 8, 9, 10, 11]], np.int64)
        runners = [
            SharedBufferRunner(open_decoder_session(version.model_path, threads=1), spec, KvStore(KvGeometry.from_spec(spec), 1, 64), max_rows_x_width=16)
            for _ in range(2)
        ]
        every = runners[0].forward(0, prompt, np.zeros(1, np.int64), np.asarray([7]), all_logits=True).copy()
        assert every.shape == (1, 7, spec.vocab_size)
        last = runners[1].forward(0, prompt, np.zeros(1, np.int64), np.asarray([7]), all_logits=False)
        assert last.shape == (1, spec.vocab_size)
        np.testing.assert_allclose(last[0], every[0, -1], atol=tolerance)
        assert int(last[0].argmax()) == int(every[0, -1].argmax())


@pytest.mark.parametrize("stand_in_diff", [5e-4, 0.0])
def test_a_large_models_evaluation_lets_a_faithful_fp32_graph_stand_in_for_the_pytorch_perplexity(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in_diff: float
) -> None:
    """The tiny Llama evaluated as if it were a large model (size threshold 0): its fp32 graph
    is within 5e-4 of PyTorch's logits, so the PyTorch perplexity pass is skipped and the fp32
    export's perplexity is the budget's basis; with no tolerance the PyTorch perplexity is
    computed after all (loading the model again) and is the basis, as for small models."""
    from appliance.export.llm import evaluation

    monkeypatch.setattr(evaluation, "GREEDY_FULL_SET_MAX_BYTES", 0)
    monkeypatch.setattr(evaluation, "STAND_IN_LOGITS_DIFF", stand_in_diff)
    settings = load_settings(state_dir=tmp_path / "state")
    result = run_export(ExportRequest(source=str(models_dir / "llama"), name="tiny-large", quant="int8"), settings)
    report = result.version.report
    assert report is not None and report.verdict == "accepted"
    quality = report.quality
    assert quality["prompts"] == evaluation.MIN_GREEDY_PROMPTS
    if stand_in_diff:
        assert quality["torch_perplexity"] is None
        assert quality["perplexity_basis"].startswith("fp32 export")
        base = quality["reference_perplexity"]
    else:
        assert quality["perplexity_basis"] == "PyTorch"
        assert quality["torch_perplexity"] == pytest.approx(quality["reference_perplexity"], rel=1e-4)
        base = quality["torch_perplexity"]
    assert quality["perplexity_increase"] == pytest.approx(max(0.0, quality["perplexity"] / base - 1), abs=2e-5)
