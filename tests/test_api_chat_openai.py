"""POST /v1/chat/completions and /v1/completions on a real uvicorn, with the official openai client."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there, how are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("chat-state")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    from appliance.repository.store import ModelRepository

    publish_adder(ModelRepository(state / "models"), "adder")
    with running_server(state, generation={"kv_budget_bytes": 64 << 20, "speculative": "prompt-lookup"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)


def _error(server: RunningServer, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    response = httpx.post(server.url(path), json=body, headers=server.auth(), timeout=30)
    return response.status_code, response.json()["error"]


def test_models_list_includes_the_generation_model(client: openai.OpenAI) -> None:
    assert MODEL in [model.id for model in client.models.list().data]


def test_openai_client_gets_a_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streamed_chat_equals_the_plain_answer_and_reports_usage_last(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_stream_ends_with_done_on_the_wire(server: RunningServer) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, headers=server.auth(), timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)
    assert "usage" not in json.loads(events[0][6:])


def test_stop_string_is_never_returned(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    text = full.choices[0].message.content or ""
    assert len(text) > 5
    stop = text[3:6]
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True}  # type: ignore[arg-type]
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == text[: text.find(stop)]


def test_n_seeded_choices_are_reproducible(client: openai.OpenAI) -> None:
    def ask() -> list[str]:
        completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0, n=3, seed=7)  # type: ignore[arg-type]
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        return [choice.message.content or "" for choice in completion.choices]

    assert ask() == ask()


def test_chat_logprobs_list_each_token_with_alternatives(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}  # type: ignore[arg-type]
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
    joined = b"".join(bytes(entry.bytes or []) for entry in content).decode("utf-8", errors="replace")
    # The text holds back an incomplete UTF-8 tail; the bytes of every token are all there.
    assert joined.startswith(completion.choices[0].message.content or "")


def test_completions_take_text_or_token_ids(client: openai.OpenAI) -> None:
    by_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert by_text.object == "text_completion"
    assert by_text.choices[0].finish_reason == "length"
    by_ids = client.completions.create(model=MODEL, prompt=[5, 17, 42], max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 3
    assert by_ids.choices[0].logprobs is not None and len(by_ids.choices[0].logprobs.tokens or []) == 6
    streamed = client.completions.create(model=MODEL, prompt=[5, 17, 42], max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == by_ids.choices[0].text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ],
)
def test_bad_chat_input_answers_400_naming_the_field(server: RunningServer, body: dict[str, object], param: str) -> None:
    request = {"model": MODEL, "messages": MESSAGES, **body}
    status, error = _error(server, "/v1/chat/completions", request)
    assert status == 400, error
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_model_answers_404_and_a_tensor_model_400(server: RunningServer) -> None:
    status, error = _error(server, "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert status == 404 and error["code"] == "model_not_found"
    status, error = _error(server, "/v1/chat/completions", {"model": "adder", "messages": MESSAGES})
    assert status == 400 and error["param"] == "model"
    assert "serves text-generation models" in str(error["message"])


def test_missing_key_answers_401(server: RunningServer) -> None:
    response = httpx.post(server.url("/v1/chat/completions"), json={"model": MODEL, "messages": MESSAGES}, timeout=30)
    assert response.status_code == 401


def test_client_that_drops_a_stream_frees_its_sequence(server: RunningServer) -> None:
    engine = server.engine(MODEL)
    forward = engine.runner.forward

    def slow_forward(*args: object, **kwargs: object) -> object:
        time.sleep(0.02)  # the tiny model would otherwise finish before the client hangs up
        return forward(*args, **kwargs)

    engine.runner.forward = slow_forward  # type: ignore[method-assign]
    # Prompt lookup would verify up to 9 tokens per run of this repetitive tiny model and
    # finish 200 tokens before the client hangs up (it did once on a loaded CI box).
    speculative, engine.speculative = engine.speculative, "off"
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, headers=server.auth(), timeout=30) as response:
            lines = response.iter_lines()
            next(lines)
            next(lines)
            # The role chunk can arrive before the engine thread has admitted the sequence.
            admitted_by = time.monotonic() + 5
            while not engine.kv.reserved_tokens and time.monotonic() < admitted_by:
                time.sleep(0.01)
            assert engine.kv.reserved_tokens > 0
        deadline = time.monotonic() + 10
        while engine.kv.reserved_tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.kv.reserved_tokens == 0
        assert not engine.scheduler.running
        assert engine.stats()["steps"] > 0
    finally:
        engine.runner.forward = forward  # type: ignore[method-assign]
        engine.speculative = speculative


def test_metrics_expose_generation_latencies_and_counters(server: RunningServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    text = httpx.get(server.url("/metrics"), headers=server.auth(), timeout=30).text
    for name in (
        "appliance_time_to_first_token_seconds_bucket",
        "appliance_time_per_output_token_seconds_bucket",
        "appliance_e2e_request_latency_seconds_count",
        "appliance_generation_tokens_total",
        "appliance_prompt_tokens_total",
        "appliance_num_requests_running",
        "appliance_kv_cache_usage_perc",
        "appliance_prefix_cache_hits_total",
        "appliance_spec_decode_num_draft_tokens_total",
    ):
        assert name in text, name


def test_openapi_declares_the_generation_routes(server: RunningServer) -> None:
    schema = httpx.get(server.url("/openapi.json"), timeout=30).json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


@pytest.mark.parametrize("text", ["a\u2028b", "line\u2029paragraph", "next\x85line", "ctrl\x1cchar", "plain é ü 中"])
def test_a_streamed_frame_stays_one_line_for_clients_that_split_on_unicode_breaks(text: str) -> None:
    # A load run caught it: a sampled token decoding to U+2028 cut a frame in two for httpx's
    # iter_lines, which splits like str.splitlines. The frame must parse back to the payload.
    from httpx._decoders import LineDecoder

    from appliance.api.openai_chat import sse_frame

    payload = {"choices": [{"index": 0, "delta": {"content": text}}]}
    frame = sse_frame(payload)
    assert frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    lines = [line for line in LineDecoder().decode(frame.decode("utf-8")) if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: ")) == payload


def test_a_request_that_waits_too_long_for_a_slot_gets_429_before_any_stream_starts(
    tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("queue-wait-state")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    generation = {"kv_budget_bytes": 64 << 20, "speculative": "off", "max_running_sequences": 1, "max_queue_wait_s": 0.2}
    with running_server(state, generation=generation) as server:
        engine = server.engine(MODEL)
        forward = engine.runner.forward

        def slow_forward(*args: object, **kwargs: object) -> object:
            time.sleep(0.02)  # keeps the only slot busy for a few seconds
            return forward(*args, **kwargs)

        engine.runner.forward = slow_forward  # type: ignore[method-assign]
        long_body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url("/v1/chat/completions"), json=long_body, headers=server.auth(), timeout=60) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(lines)  # the role chunk: the long stream has its slot
            for stream in (True, False):
                body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": stream}
                refused = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.auth(), timeout=60)
                assert refused.status_code == 429, refused.text
                assert float(refused.headers["Retry-After"]) > 0
                assert refused.headers["content-type"].startswith("application/json")
                error = refused.json()["error"]
                assert "waited" in error["message"] and "slot" in error["message"]
            completion = httpx.post(
                server.url("/v1/completions"), json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True},
                headers=server.auth(), timeout=60,
            )
            assert completion.status_code == 429
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        # The slot is free again: the same requests are served.
        client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))  # type: ignore[arg-type]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        # More choices than slots: the later ones wait for their siblings, not refused (each
        # takes ~0.4 s here, twice the queue-wait limit).
        for stream in (False, True):
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "n": 3, "ignore_eos": True, "stream": stream}
            answer = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.auth(), timeout=60)
            assert answer.status_code == 200, answer.text
            if stream:
                frames = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
                finished = {c["index"] for f in frames for c in f["choices"] if c.get("finish_reason") == "length"}
            else:
                finished = {c["index"] for c in answer.json()["choices"] if c["finish_reason"] == "length"}
            assert finished == {0, 1, 2}
        metrics = httpx.get(server.url("/metrics"), headers=server.auth(), timeout=30).text
        assert 'appliance_request_success_total{finished_reason="rejected",model="tiny-llama"} 3.0' in metrics
        assert "appliance_request_queue_time_seconds_count" in metrics
