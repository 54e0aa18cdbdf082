"""Tiny decoders exported through the real export stage, and a plain reference decode loop.

`tiny_decoders` (session fixture, import it into a test module) exports a random Llama-like
model as fp32 and int4 (graph kind "genai") and a random GPT-2 as fp32 (graph kind "optimum")
into one state directory, and the Llama as fp16 (the CUDA layout) into another, once per test
run. `reference_greedy` is the straightforward loop the
engine must agree with: batch 1, the KV cache fed back as plain arrays, argmax each step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from appliance.config import GenerationSettings
from appliance.generation.engine import GenerationEngine
from appliance.generation.events import TokenEvent
from appliance.generation.params import GenerationRequest
from appliance.generation.placement import Placement
from appliance.repository.store import ModelRepository, ModelVersion


KV_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8}
#: Token-id prompts of different lengths for the tiny decoders (vocabulary ~300).
PROMPTS = [
    [5, 17, 42, 99, 150, 7],
    [33, 64, 128, 250, 12, 9, 81, 77, 45, 3, 18],
    [200, 201, 202],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
]


@dataclass
class TinyDecoders:
    state_dir: Path
    llama_fp32: ModelVersion
    llama_int4: ModelVersion
    gpt2_fp32: ModelVersion
    llama_fp16: ModelVersion
    #: int4 weights with an int8 KV cache (`--kv-cache int8`), in a state directory of its own.
    llama_int4_kv8: ModelVersion


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory) -> TinyDecoders:
    from appliance.config import load_settings
    from appliance.export.pipeline import ExportRequest, run_export
    from tests.helpers.decoders import make_tiny_gpt2, make_tiny_llama

    root = tmp_path_factory.mktemp("tiny-decoders")
    settings = load_settings(state_dir=root / "state")
    llama = make_tiny_llama(root / "llama")
    gpt2 = make_tiny_gpt2(root / "gpt2")
    fp32 = run_export(ExportRequest(source=str(llama), name="tiny-llama", task="text-generation", quant="fp32"), settings).version
    int4 = run_export(ExportRequest(source=str(llama), name="tiny-llama", task="text-generation", quant="int4"), settings).version
    gpt = run_export(ExportRequest(source=str(gpt2), name="tiny-gpt2", task="text-generation", quant="fp32"), settings).version
    # The CUDA layout (fp16 activations and KV cache), in a state directory of its own so the
    # servers that tests start on `state_dir` do not serve it.
    fp16_settings = load_settings(state_dir=root / "state-fp16")
    fp16 = run_export(ExportRequest(source=str(llama), name="tiny-llama", task="text-generation", quant="fp16"), fp16_settings).version
    kv8_settings = load_settings(state_dir=root / "state-kv8")
    kv8 = run_export(
        ExportRequest(source=str(llama), name="tiny-llama", task="text-generation", quant="int4", kv_cache="int8"), kv8_settings
    ).version
    repository = ModelRepository(settings.models_dir)
    return TinyDecoders(
        settings.state_dir,
        repository.get("tiny-llama", fp32.version),
        repository.get("tiny-llama", int4.version),
        repository.get("tiny-gpt2", gpt.version),
        ModelRepository(fp16_settings.models_dir).get("tiny-llama", fp16.version),
        ModelRepository(kv8_settings.models_dir).get("tiny-llama", kv8.version),
    )


def reference_greedy(version: ModelVersion, prompt: Sequence[int], max_new: int, *, prompt_chunk: int | None = None) -> list[int]:
    """Greedy decoding the obvious way: one sequence, KV fed back, argmax; EOS ignored.

    The prompt goes in one run, or in runs of `prompt_chunk` tokens. An int8-cache graph
    attends the prompt in fp32 (its present outputs are then the new positions only) and
    decodes through the cache, as the engine runs it."""
    spec = version.manifest.generation
    assert spec is not None
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    input_names = {node.name for node in session.get_inputs()}
    past: dict[str, np.ndarray] = {}
    for layer in range(spec.num_layers):
        for template in (spec.past_key_name, spec.past_value_name):
            past[template.format(layer=layer)] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), KV_DTYPES[spec.kv_datatype])
    output_names = [node.name for node in session.get_outputs()]
    step = prompt_chunk or len(prompt)
    runs = [list(prompt[start : start + step]) for start in range(0, len(prompt), step)]
    done = 0
    tokens: list[int] = []
    while len(tokens) < max_new:
        current = runs.pop(0) if runs else [tokens[-1]]
        feeds = {"input_ids": np.asarray([current], np.int64), "attention_mask": np.ones((1, done + len(current)), np.int64), **past}
        if "position_ids" in input_names:
            feeds["position_ids"] = np.arange(done, done + len(current), dtype=np.int64)[None, :]
        if spec.logits_start_input:
            feeds[spec.logits_start_input] = np.zeros(1, np.int64)  # logits for every position
        in_fp32 = spec.fp32_attention_input is not None and len(current) > 1
        if spec.fp32_attention_input is not None:
            feeds[spec.fp32_attention_input] = np.asarray([in_fp32])
        outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
        for layer in range(spec.num_layers):
            for past_name, present_name in ((spec.past_key_name, spec.present_key_name), (spec.past_value_name, spec.present_value_name)):
                present = outputs[present_name.format(layer=layer)]
                name = past_name.format(layer=layer)
                past[name] = np.concatenate([past[name], present], axis=2) if in_fp32 else present
        done += len(current)
        if not runs:
            tokens.append(int(outputs["logits"][0, -1].argmax()))
    return tokens


def make_engine(
    version: ModelVersion, *, draft: ModelVersion | None = None, placement: Placement | None = None, **settings: object
) -> GenerationEngine:
    settings.setdefault("kv_budget_bytes", 64 << 20)
    settings.setdefault("speculative", "off")
    engine = GenerationEngine.from_version(version, GenerationSettings(**settings), threads=1, draft_version=draft, placement=placement)
    engine.start()
    return engine


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish_reason: str | None
    events: list[TokenEvent]


async def generate(engine: GenerationEngine, prompt: Sequence[int], params: GenerationRequest, *, timeout_s: float | None = None) -> Generated:
    events: list[TokenEvent] = []
    async for event in engine.generate(list(prompt), params, timeout_s=timeout_s):
        events.append(event)
    return Generated(
        [token for event in events for token in event.token_ids],
        "".join(event.text for event in events),
        events[-1].finish_reason if events else None,
        events,
    )


def greedy(max_tokens: int, **extra: object) -> GenerationRequest:
    return GenerationRequest(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)  # type: ignore[arg-type]


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]
