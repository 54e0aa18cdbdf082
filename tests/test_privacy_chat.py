"""The logging mode applied to chat, where the text is richest: `full` keeps the prompt and the
completion (streamed or not) with an expiry; `metadata` keeps token counts and never text."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import openai
import pytest
from sqlalchemy import select

from appliance.store.admin_models import RequestLogEntry
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

MODEL = "tiny-llama"
PROMPT = "hello there, how are you today?"


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("privacy-chat")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    with running_server(state, logging_mode="full", generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


def _rows(server: RunningServer) -> list[RequestLogEntry]:
    assert server.app.state.admin.request_log.flush()
    with server.app.state.admin.database.session() as session:
        return list(session.scalars(select(RequestLogEntry).order_by(RequestLogEntry.id)))


def test_full_mode_keeps_prompt_and_completion_of_plain_and_streamed_chat(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    ]
    first, second = _rows(server)[-2:]
    for row in (first, second):
        assert row.model == MODEL and row.status == 200 and row.endpoint == "/v1/chat/completions"
        assert row.prompt_text == f"user: {PROMPT}" and row.text_expires_at is not None
        assert row.completion_tokens and row.completion_tokens <= 8
    assert first.completion_text == plain.choices[0].message.content
    assert second.completion_text == "".join(pieces)
    assert first.prompt_tokens == plain.usage.prompt_tokens


def test_metadata_mode_keeps_the_token_counts_but_no_text(server: RunningServer) -> None:
    policy = server.app.state.admin.privacy
    policy.set_logging("metadata", 7, actor="test", address="127.0.0.1")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)
    for stream in (False, True):
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0, stream=stream
        )
        if stream:
            list(answer)
    for row in _rows(server)[-2:]:
        assert row.prompt_text is None and row.completion_text is None and row.text_expires_at is None
        assert row.completion_tokens and row.key_id == server.key.split("_")[1]
