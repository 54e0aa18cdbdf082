"""Chat templates render as transformers' apply_chat_template does, so templates written for it work.

The templates here are written for these tests in the style model templates use (tags on lines
of their own, trimmed by trim_blocks / lstrip_blocks); the expected prompts are spelled out.
"""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

import pytest

from appliance.errors import InvalidInput
from appliance.generation.chat_template import ChatTemplate

FIRST_SYSTEM_ONLY = (
    "{% for message in messages %}\n"
    "    {% if message.role == 'system' %}\n"
    "[SYS]{{ message.content }}[/SYS]\n"
    "        {% break %}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% for message in messages %}\n"
    "    {% if message.role == 'system' %}{% continue %}{% endif %}\n"
    "<{{ message.role }}>{{ message.content }}</{{ message.role }}>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

TAKING_TURNS = (
    "{% for message in messages %}\n"
    "    {% set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}\n"
    "    {% if message.role != expected %}\n"
    "{{ raise_exception('roles must take turns, user first: message ' ~ loop.index0 ~ ' is ' ~ message.role) }}\n"
    "    {% endif %}\n"
    "{{ message.role | upper }}: {{ message.content }}\n"
    "{% endfor %}\n"
)

WITH_TOOLS = (
    "{% if tools %}\n"
    "<tools>\n"
    "    {% for tool in tools %}\n"
    "{{ tool | tojson(indent=2) }}\n"
    "    {% endfor %}\n"
    "</tools>\n"
    "{% endif %}\n"
    "{% for message in messages %}\n"
    "    {% if message.role == 'assistant' and message.tool_calls %}\n"
    "<assistant>\n"
    "        {% for tool_call in message.tool_calls %}\n"
    '<call id="{{ tool_call.id }}" name="{{ tool_call.function.name }}">{{ tool_call.function.arguments | tojson }}</call>\n'
    "        {% endfor %}\n"
    "</assistant>\n"
    "    {% elif message.role == 'tool' %}\n"
    '<result id="{{ message.tool_call_id }}">{{ message.content }}</result>\n'
    "    {% else %}\n"
    "<{{ message.role }}>{{ message.content }}</{{ message.role }}>\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<assistant>\n"
    "{% endif %}\n"
)

WITH_DOCUMENTS = (
    "{% if documents %}\n"
    "    {% for document in documents %}\n"
    "<doc {{ loop.index }}: {{ document.title }}>{{ document.text }}</doc>\n"
    "    {% endfor %}\n"
    "{% endif %}\n"
    "{% for message in messages %}\n"
    "<{{ message.role }}>{{ message.content }}\n"
    "{% endfor %}\n"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
WEATHER_TOOL_INDENTED = """{
  "type": "function",
  "function": {
    "name": "get_weather",
    "parameters": {
      "type": "object",
      "properties": {
        "city": {
          "type": "string"
        }
      }
    }
  }
}"""

USER_ASKS = {"role": "user", "content": "Weather in Paris?"}


def _call(call_id: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def _render(source: str, messages: list[dict[str, Any]], **options: Any) -> str:
    return ChatTemplate(source, bos_token=None, eos_token=None).render(messages, **options)


def test_break_and_continue_work_in_loops_over_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Ignored: only the first system message counts."},
        {"role": "assistant", "content": "hello"},
    ]
    assert _render(FIRST_SYSTEM_ONLY, messages) == "[SYS]Be brief.[/SYS]\n<user>hi</user>\n<assistant>hello</assistant>\n<assistant>"


def test_raise_exception_refuses_roles_that_do_not_take_turns() -> None:
    assert _render(TAKING_TURNS, [USER_ASKS, {"role": "assistant", "content": "Sunny."}]) == "USER: Weather in Paris?\nASSISTANT: Sunny.\n"
    with pytest.raises(InvalidInput) as caught:
        _render(TAKING_TURNS, [USER_ASKS, {"role": "user", "content": "Hello?"}])
    assert caught.value.field == "messages"
    assert "roles must take turns, user first: message 1 is user" in caught.value.message


def test_tools_tool_calls_and_tool_results_render_with_parsed_arguments() -> None:
    messages = [
        USER_ASKS,
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1", '{"city":"Paris","unit":"°C"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, sunny"},
    ]
    before = copy.deepcopy(messages)
    text = _render(WITH_TOOLS, messages, tools=[WEATHER_TOOL])
    assert text == (
        f"<tools>\n{WEATHER_TOOL_INDENTED}\n</tools>\n"
        "<user>Weather in Paris?</user>\n"
        '<assistant>\n<call id="call_1" name="get_weather">{"city": "Paris", "unit": "°C"}</call>\n</assistant>\n'
        '<result id="call_1">21 °C, sunny</result>\n'
        "<assistant>\n"
    )
    assert messages == before, "the caller's messages keep their arguments strings"


@pytest.mark.parametrize(
    ("arguments", "rendered"),
    [("not json", '"not json"'), ("[1, 2]", '"[1, 2]"'), ('{"city": ', '"{\\"city\\": "')],
)
def test_arguments_that_are_not_a_json_object_stay_a_string(arguments: str, rendered: str) -> None:
    text = _render(WITH_TOOLS, [USER_ASKS, {"role": "assistant", "tool_calls": [_call("call_2", arguments)]}], add_generation_prompt=False)
    assert text == f'<user>Weather in Paris?</user>\n<assistant>\n<call id="call_2" name="get_weather">{rendered}</call>\n</assistant>\n'


def test_absent_tools_and_documents_are_none() -> None:
    assert _render(WITH_TOOLS, [USER_ASKS], add_generation_prompt=False) == "<user>Weather in Paris?</user>\n"
    assert _render("{{ tools is none }} {{ documents is none }}", [USER_ASKS]) == "True True"


def test_documents_reach_the_template() -> None:
    documents = [{"title": "Paris", "text": "Capital of France."}, {"title": "Lyon", "text": "On the Rhône."}]
    assert _render(WITH_DOCUMENTS, [USER_ASKS], documents=documents) == (
        "<doc 1: Paris>Capital of France.</doc>\n<doc 2: Lyon>On the Rhône.</doc>\n<user>Weather in Paris?\n"
    )


def test_strftime_now_gives_the_local_date() -> None:
    before = date.today().isoformat()
    text = _render('Today is {{ strftime_now("%Y-%m-%d") }}.', [USER_ASKS])
    assert text in {f"Today is {before}.", f"Today is {date.today().isoformat()}."}


def test_tojson_takes_json_dumps_options_and_does_not_escape_html() -> None:
    tool = {"b": 1, "a": [1, 2], "c": "<é & ü>"}
    compact = '{% for tool in tools %}{{ tool | tojson(separators=(",", ":"), sort_keys=True) }}{% endfor %}'
    assert _render(compact, [USER_ASKS], tools=[tool]) == '{"a":[1,2],"b":1,"c":"<é & ü>"}'
    assert _render("{{ tools[0] | tojson }}", [USER_ASKS], tools=[tool]) == '{"b": 1, "a": [1, 2], "c": "<é & ü>"}'
    assert _render("{{ tools[0].c | tojson(ensure_ascii=True) }}", [USER_ASKS], tools=[tool]) == '"<\\u00e9 & \\u00fc>"'


@pytest.mark.parametrize(
    ("source", "mentions"),
    [
        (WITH_TOOLS, True),
        ("{% if tools is defined and tools %}{{ tools | length }}{% endif %}", True),
        (FIRST_SYSTEM_ONLY, False),
        ("{# tools are described elsewhere #}tools: {{ messages[0]['tools'] }}{% set x = 'tools' %}", False),
    ],
)
def test_mentions_tools_reads_the_template_not_its_text(source: str, mentions: bool) -> None:
    assert ChatTemplate(source, bos_token=None, eos_token=None).mentions_tools is mentions


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{% set _ = messages.append(1) %}",
        "{{ messages[0].update({'role': 'system'}) }}",
        "{{ messages | length // 0 }}",
    ],
)
def test_sandbox_escapes_and_template_bugs_are_a_400(source: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInput) as caught:
        _render(source, messages)
    assert caught.value.field == "messages" and caught.value.message.startswith("messages: ")
    assert messages == [{"role": "user", "content": "hi"}]
