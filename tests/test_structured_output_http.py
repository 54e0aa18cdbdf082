"""Structured output and tool calling over HTTP, on a real uvicorn with a tiny random decoder
(its chat template has no tools section, so tools use the generic JSON format), with the
official openai client where it applies."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.schemas import TEST_SCHEMAS
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_embedder

MODEL = "tiny-llama"
#: A tiny decoder with room for the tools' description.
TOOLS_MODEL = "tiny-tools"
TOOLS_CONTEXT = 2048
MESSAGES = [{"role": "user", "content": "Fill in the form."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False},
    },
}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from appliance.config import load_settings
    from appliance.export.pipeline import ExportRequest, run_export
    from appliance.repository.store import ModelRepository
    from tests.helpers.decoders import make_tiny_llama

    state = tmp_path_factory.mktemp("structured-state")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    publish_embedder(ModelRepository(state / "models"), "embedder")
    # The tools' description (a system message) takes ~600 tokens of the tiny vocabulary.
    source = make_tiny_llama(tmp_path_factory.mktemp("tools-llama"), context=TOOLS_CONTEXT)
    run_export(ExportRequest(source=str(source), name=TOOLS_MODEL, task="text-generation", quant="fp32"), load_settings(state_dir=state))
    with running_server(state, generation={"kv_budget_bytes": 64 << 20, "speculative": "prompt-lookup"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_openai_parse_with_a_pydantic_model_returns_a_populated_object(client: openai.OpenAI) -> None:
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(model=MODEL, messages=MESSAGES, response_format=Person, max_tokens=120, temperature=0)  # type: ignore[arg-type]
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120
    assert completion.choices[0].finish_reason == "stop"


def test_streamed_answers_parse_and_validate_for_every_test_schema(client: openai.OpenAI) -> None:
    for number, schema in enumerate(TEST_SCHEMAS):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=200,
            temperature=0.8,
            seed=number,
            stream=True,
            response_format=_schema_format(schema),  # type: ignore[arg-type]
        )
        chunks = [chunk for chunk in stream if chunk.choices]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_on_chat_and_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=150, temperature=0, response_format={"type": "json_object"})  # type: ignore[arg-type]
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    completion = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=60, temperature=0, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}
    )
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop" and len(text) == 6 and text[:3].isdigit() and text[3] == "-"
    choice = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=20, temperature=1.0, seed=3, extra_body={"structured_outputs": {"choice": ["left", "right"]}}
    )
    assert choice.choices[0].text in ("left", "right")


def _call_arguments(call: object) -> dict:
    return json.loads(call.function.arguments)  # type: ignore[attr-defined]


def test_required_tool_choice_always_gives_a_valid_call(client: openai.OpenAI) -> None:
    parameters = {"get_weather": WEATHER["function"]["parameters"], "get_time": CLOCK["function"]["parameters"]}  # type: ignore[index]
    for seed in range(6):
        completion = client.chat.completions.create(
            model=TOOLS_MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=[WEATHER, CLOCK],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=seed % 2 == 0,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
        )
        choice = completion.choices[0]
        if seed % 2 == 0 and choice.finish_reason == "length":
            continue  # with parallel calls allowed, a random model may go on calling until max_tokens
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(_call_arguments(call), parameters[call.function.name])  # type: ignore[union-attr]


def test_a_named_tool_choice_calls_that_function_and_streams_the_same_call(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    plain = client.chat.completions.create(
        model=TOOLS_MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=120, temperature=0  # type: ignore[arg-type,list-item]
    )
    calls = plain.choices[0].message.tool_calls
    assert calls and [call.function.name for call in calls] == ["get_time"]  # type: ignore[union-attr]
    assert _call_arguments(calls[0])["zone"] in ("utc", "cet")
    stream = client.chat.completions.create(
        model=TOOLS_MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=120, temperature=0, stream=True  # type: ignore[arg-type,list-item]
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function and delta.function.name:
                assert delta.id and delta.index not in names
                names[delta.index] = delta.function.name
            arguments[delta.index] = arguments.get(delta.index, "") + ((delta.function.arguments if delta.function else None) or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and names == {0: "get_time"}
    assert json.loads(arguments[0]) == _call_arguments(calls[0])


def test_a_tool_round_trip_renders_the_call_and_its_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=TOOLS_MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="required", max_tokens=150, temperature=0  # type: ignore[arg-type,list-item]
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    final = client.chat.completions.create(model=TOOLS_MODEL, messages=conversation, tools=[WEATHER], max_tokens=8, temperature=0)  # type: ignore[arg-type,list-item]
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.usage is not None and final.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def _error(server: RunningServer, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    response = httpx.post(server.url(path), json=body, headers=server.auth(), timeout=30)
    return response.status_code, response.json()["error"]


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"response_format": _schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})}, "response_format", "strin"),
        ({"response_format": _schema_format({"type": "string", "format": "hostname-ish"})}, "response_format", "hostname-ish"),
        ({"response_format": _schema_format({"enum": ["x" * 100] * 2000})}, "response_format", "bytes"),
        ({"response_format": {"type": "yaml"}}, "response_format", ""),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "tools[0].function.name: field required"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "requires tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(server: RunningServer, extra: dict, param: str, needle: str) -> None:
    status, error = _error(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra})
    assert status == 400, error
    assert error["param"] == param and needle in str(error["message"]), error


def test_response_format_on_an_embeddings_model_is_a_400_naming_it(server: RunningServer) -> None:
    status, error = _error(server, "/v1/embeddings", {"model": "embedder", "input": "hi", "response_format": {"type": "json_object"}})
    assert status == 400 and error["param"] == "response_format", error
