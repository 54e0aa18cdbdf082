"""Every decoder architecture the export accepts, proven against PyTorch: a tiny random model
of each (tests/helpers/decoders.py: 2 layers, hidden 64, the architecture's own config
features) is exported at fp32 through the real export stage, served by the real generation
engine, and its greedy continuation compared with transformers' `generate` (16 new tokens,
EOS ignored). A step where PyTorch's top two logits are within TIE_MARGIN is a near tie:
there, and only there, a faithful graph may pick the other token (the assertion says so).
The chat template renders as transformers renders it, and the int4 and int8 exports are
accepted, load and serve. The windowed models (Mistral, Gemma 2, Gemma 3) have an 8-token
window, which every continuation crosses.

Time (2-core box, whole module): ~85 s, every case exported at fp32, int4 and int8, so no
variant is sampled. A plain case costs ~3 s (each tiny export 1-2 s, most of it the export's
PyTorch reference); a windowed one 9-14 s, because transformers builds each step's
sliding-window mask with vmap (~9 ms a mask, 8 prompts x 64 steps per export), and Gemma 2's
eager attention builds one for both of its layers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import ExportError
from appliance.export.llm.layer_attention import FULL_ATTENTION, layer_attention
from appliance.export.llm.routes import GENAI_ARCHITECTURES, OPTIMUM_ARCHITECTURES, fit_config_for_builder, route_for
from appliance.repository.store import ModelVersion
from tests.helpers.decoders import PHI3_ORIGINAL_CONTEXT, TINY_DECODER_CASES
from tests.helpers.generation import PROMPTS, generate, greedy, make_engine

#: PyTorch's top two logits closer than this: a near tie, where the engine may differ.
TIE_MARGIN = 0.01
NEW_TOKENS = 16
CASES = list(TINY_DECODER_CASES)
MESSAGES = [
    {"role": "system", "content": "You answer in plain words."},
    {"role": "user", "content": "How are you today?"},
]

class Exports:
    """Each case's tiny Hugging Face folder and its exports, made on first use (once per module)."""

    def __init__(self, root: Path) -> None:
        from appliance.config import load_settings

        self.root = root
        self.settings = load_settings(state_dir=root / "state")
        self._versions: dict[tuple[str, str], ModelVersion] = {}

    def folder(self, case: str) -> Path:
        folder = self.root / case
        if not folder.exists():
            TINY_DECODER_CASES[case][1](folder)
        return folder

    def __call__(self, case: str, quant: str) -> ModelVersion:
        from appliance.export.pipeline import ExportRequest, run_export

        if (case, quant) not in self._versions:
            request = ExportRequest(source=str(self.folder(case)), name=f"tiny-{case}", task="text-generation", quant=quant)
            self._versions[case, quant] = run_export(request, self.settings).version
        return self._versions[case, quant]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("architectures"))


def _report(version: ModelVersion) -> dict:
    return json.loads((version.path / "report.json").read_text())


def _serve(version: ModelVersion, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = make_engine(version)
    try:
        return [asyncio.run(generate(engine, prompt, greedy(max_tokens))).tokens for prompt in prompts]
    finally:
        engine.stop()


def _chat_prompt(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))


def _transformers_greedy(folder: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' `generate` (greedy, EOS ignored) and each step's top-two logit gap, with
    the attention implementation that computes the model (eager for Gemma 2's softcapping)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from appliance.export.llm.torch_reference import attention_implementation

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attention_implementation(config)
    ).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
            temperature=None, top_p=None, top_k=None, pad_token_id=0,
        )
        tokens = [int(token) for token in output[0, len(prompt):]]
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float().numpy()
    top_two = np.sort(logits, axis=1)[:, -2:]
    return tokens, [float(gap) for gap in top_two[:, 1] - top_two[:, 0]]


def test_every_accepted_architecture_has_a_tiny_model_under_test() -> None:
    tested = {architecture for architecture, _ in TINY_DECODER_CASES.values()}
    assert tested == {*GENAI_ARCHITECTURES, *OPTIMUM_ARCHITECTURES}


@pytest.mark.parametrize("case", CASES)
def test_fp32_export_is_accepted_as_faithful_to_pytorch(case: str, export: Exports) -> None:
    report = _report(export(case, "fp32"))
    assert report["verdict"] == "accepted", report["quality"]
    assert report["quality"]["conversion"] == "faithful to PyTorch", report["quality"]
    assert report["details"]["graph"] == route_for([TINY_DECODER_CASES[case][0]])


@pytest.mark.parametrize("case", CASES)
def test_fp32_greedy_through_the_engine_continues_as_transformers_generate(case: str, export: Exports) -> None:
    version = export(case, "fp32")
    folder = export.folder(case)
    prompts = [*PROMPTS, _chat_prompt(folder)]
    served = _serve(version, prompts, NEW_TOKENS)
    near_ties: list[str] = []
    for prompt, tokens in zip(prompts, served, strict=True):
        expected, gaps = _transformers_greedy(folder, prompt)
        assert len(tokens) == NEW_TOKENS
        step = next((i for i, (got, want) in enumerate(zip(tokens, expected, strict=True)) if got != want), None)
        if step is None:
            continue
        assert gaps[step] < TIE_MARGIN, (
            f"{case}: the engine left transformers' greedy continuation at step {step} of prompt {prompt}, "
            f"where PyTorch's top two logits were {gaps[step]:.4f} apart (only a near tie, < {TIE_MARGIN}, may "
            f"differ): engine {tokens}, transformers {expected}"
        )
        near_ties.append(f"prompt {prompt[:4]}...: step {step}, gap {gaps[step]:.4f}")
    # Parting at a near tie is allowed, but not everywhere: that would hide a wrong graph.
    assert len(near_ties) <= 1, f"{case}: the engine parted from transformers at near ties on {near_ties}"


@pytest.mark.parametrize("case", CASES)
def test_the_chat_template_renders_as_transformers_renders_it(case: str, export: Exports) -> None:
    from transformers import AutoTokenizer

    version = export(case, "fp32")
    engine = make_engine(version)
    try:
        assert engine.chat_template is not None
        text = engine.chat_template.render(MESSAGES)
        ids = engine.tokenizer.encode(text, special_text=True)
    finally:
        engine.stop()
    tokenizer = AutoTokenizer.from_pretrained(export.folder(case))
    assert text == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ids == _chat_prompt(export.folder(case))


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("case", CASES)
def test_quantised_exports_are_accepted_load_and_serve(case: str, quant: str, export: Exports) -> None:
    version = export(case, quant)
    report = _report(version)
    assert report["verdict"] == "accepted" and version.manifest.quantization == quant, report["quality"]
    vocab_size = version.manifest.generation.vocab_size  # type: ignore[union-attr]
    for tokens in _serve(version, PROMPTS[:2], 4):
        assert len(tokens) == 4 and all(0 <= token < vocab_size for token in tokens)


def test_a_phi3_config_without_longrope_factors_gets_the_builders_plain_phi3_graph() -> None:
    from transformers import Phi3Config

    trimmed = Phi3Config(max_position_embeddings=256, architectures=["Phi3ForCausalLM"])
    assert trimmed.original_max_position_embeddings == 4096 and trimmed.rope_scaling is None
    assert fit_config_for_builder(trimmed) and trimmed.original_max_position_embeddings == 256
    longrope = Phi3Config(
        max_position_embeddings=256, original_max_position_embeddings=64, architectures=["Phi3ForCausalLM"],
        hidden_size=64, num_attention_heads=4,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    )
    assert fit_config_for_builder(longrope) == [] and longrope.original_max_position_embeddings == 64


def test_a_longrope_phi3_is_served_within_its_original_context(export: Exports) -> None:
    version = export("phi3-longrope", "fp32")
    config = json.loads((export.folder("phi3-longrope") / "config.json").read_text())
    assert config["max_position_embeddings"] > PHI3_ORIGINAL_CONTEXT
    assert version.manifest.generation.context_length == PHI3_ORIGINAL_CONTEXT  # type: ignore[union-attr]


def test_each_layer_attends_as_its_transformers_config_says() -> None:
    from transformers import Gemma2Config, MistralConfig, SmolLM3Config

    gemma2 = layer_attention(Gemma2Config(num_hidden_layers=2, sliding_window=8))
    assert [(layer.window, layer.rotary) for layer in gemma2] == [(8, True), (FULL_ATTENTION, True)]
    mistral = layer_attention(MistralConfig(num_hidden_layers=2, sliding_window=8))
    assert [layer.window for layer in mistral] == [8, 8]
    smollm3 = SmolLM3Config(num_hidden_layers=2, no_rope_layers=[1, 0], architectures=["SmolLM3ForCausalLM"])
    assert [layer.rotary for layer in layer_attention(smollm3)] == [True, False]
    assert fit_config_for_builder(smollm3) and smollm3.no_rope_layers == [1, 1]


def test_an_architecture_refused_by_name_says_why() -> None:
    with pytest.raises(ExportError) as refused:
        route_for(["Gemma3ForConditionalGeneration"])
    assert "vision encoder" in refused.value.message and "Gemma3ForCausalLM" in refused.value.message
