"""The real default LLM (SmolLM2-135M-Instruct, int4) in the generation engine and behind the chat API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance.repository.store import ModelRepository, ModelVersion
from tests.helpers.generation import generate, greedy, make_engine, reference_greedy
from tests.helpers.server import RunningServer, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(exported_smollm2: ModelRepository) -> ModelVersion:
    return exported_smollm2.get("smollm2-135m-instruct")


def test_engine_greedy_equals_the_reference_loop_on_smollm2(smollm2: ModelVersion) -> None:
    engine = make_engine(smollm2, kv_budget_bytes=256 << 20)
    try:
        assert engine.chat_template is not None
        prompt = engine.tokenizer.encode(
            engine.chat_template.render([{"role": "user", "content": "Explain in two sentences why the sky is blue."}]), special_text=True
        )
        assert asyncio.run(generate(engine, prompt, greedy(24))).tokens == reference_greedy(smollm2, prompt, 24)
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def server(exported_smollm2: ModelRepository) -> Iterator[RunningServer]:
    state: Path = exported_smollm2.root.parent
    with running_server(state, create_keys={"smol-chat": ["infer"]}, generation={"kv_budget_bytes": 512 << 20}) as running:
        yield running


def test_default_model_answers_a_chat_question_through_the_openai_client(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)
    completion = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=32,
        temperature=0,
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == completion.choices[0].message.content
