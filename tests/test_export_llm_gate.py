"""The export's gate catches a wrong conversion: the fp32 graph must compute what the PyTorch
model computes (logits within tolerance, greedy continuations identical except at near ties)
before any quality budget is looked at. OLMo through the model builder is the real wrong
conversion: its graph is judged with the real evaluator against the real PyTorch model, and
the architecture is refused by name. A faithful conversion says so in its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import ExportError
from appliance.export.llm.evaluation import LOGITS_TOLERANCE, DecoderEvaluator
from appliance.export.llm.graph_facts import generation_spec
from appliance.export.llm.routes import MODEL_FILE, build_genai, route_for
from appliance.export.tasks.base import DATA_DIR, ProgressReporter
from tests.helpers.decoders import make_tiny_olmo
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture


def test_a_conversion_that_differs_from_pytorch_fails_the_gate_even_within_its_budget(tmp_path: Path) -> None:
    folder = make_tiny_olmo(tmp_path / "olmo")
    graph = tmp_path / "graph"
    build_genai(folder, graph, tmp_path / "builder-cache")
    spec = generation_spec(
        graph / MODEL_FILE, graph="genai", config=json.loads((folder / "config.json").read_text()),
        generation_config={}, eos_token_ids=[2], bos_token_id=1,
    )
    evaluator = DecoderEvaluator(
        hf_dir=folder, tokenizer_path=folder / "tokenizer.json", chat_template=None, special_tokens={},
        context_length=spec.context_length, data_dir=DATA_DIR, threads=1, progress=ProgressReporter(),
    )
    quality, loss, failure = evaluator.evaluate(graph / MODEL_FILE, graph / MODEL_FILE, spec, spec)
    assert failure is not None and "PyTorch" in failure, quality
    assert quality["logits_max_abs_diff"] > LOGITS_TOLERANCE and quality["conversion"].startswith("wrong:")
    assert loss < 0.01, "its perplexity alone would have passed the budget: only the gate catches it"


def test_an_architecture_that_converts_wrong_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(ExportError) as refused:
        route_for(["OlmoForCausalLM"])
    assert "LlamaForCausalLM" in refused.value.message and "not supported" in refused.value.message


def test_a_faithful_conversion_says_so_in_every_variants_report(tiny_decoders: TinyDecoders) -> None:
    for version in (tiny_decoders.llama_fp32, tiny_decoders.llama_int4, tiny_decoders.gpt2_fp32):
        report = json.loads((version.path / "report.json").read_text())
        assert report["quality"]["conversion"] == "faithful to PyTorch", report["quality"]
        assert "conversion_failure" not in report["budget"] and report["budget"]["metric"].startswith("perplexity / torch_perplexity")
