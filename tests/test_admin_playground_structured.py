"""The playground's structured output and tools in a real browser (Debian's chromium through
Playwright) against a real server with a tiny random decoder: a JSON schema answer parses and
fits the schema, an editor that is not JSON is reported inline and sends nothing, and offered
tools come back as tool-call blocks (streamed and not).

The decoder is a tiny Llama with a 2048-token context, exported like any model: the tools'
description (a system message) does not fit the standard tiny Llama's 256 tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest

from tests.helpers.admin import CHROMIUM, CHROMIUM_ARGS, create_admin, open_playground
from tests.helpers.server import RunningServer, running_server

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")

MODEL = "tiny-tools"
CONTEXT = 2048
DIGIT_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}
#: The parameters of the tools editor's example function (admin/pages/playground.py).
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CHAT_URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from appliance.config import load_settings
    from appliance.export.pipeline import ExportRequest, run_export
    from tests.helpers.decoders import make_tiny_llama

    state = tmp_path_factory.mktemp("playground-structured")
    source = make_tiny_llama(tmp_path_factory.mktemp("playground-llama"), context=CONTEXT)
    run_export(ExportRequest(source=str(source), name=MODEL, task="text-generation", quant="fp32"), load_settings(state_dir=state))
    create_admin(state)
    with running_server(state, generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


@dataclass
class Browser:
    """One chromium for the module; each test opens its own signed-in playground page."""

    browser: Any
    server: RunningServer
    console_errors: list[str] = field(default_factory=list)
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)

    def playground(self) -> Any:
        page = open_playground(self.browser, self.server.base_url, self.server.key or "", MODEL, "chat")
        page.on("console", lambda message: self.console_errors.append(message.text) if message.type == "error" else None)
        page.on("request", self._record)
        return page

    def _record(self, request: Any) -> None:
        if request.url.endswith(CHAT_URL):
            self.chat_bodies.append(json.loads(request.post_data or "null"))


@pytest.fixture(scope="module")
def chromium(server: RunningServer) -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield Browser(browser, server)
        finally:
            browser.close()


@pytest.fixture
def ui(chromium: Browser) -> Iterator[Browser]:
    chromium.console_errors.clear()
    chromium.chat_bodies.clear()
    yield chromium
    assert [text for text in chromium.console_errors if "Content Security Policy" in text] == []


def _settings(page: Any, *, max_tokens: int, seed: int = 0, stream: bool = True) -> None:
    page.fill("#pg-max-tokens", str(max_tokens))
    page.fill("#pg-temperature", "0")
    page.fill("#pg-seed", str(seed))
    page.fill("#pg-input", "Fill in the form.")
    page.set_checked("#pg-stream", stream)


def _wait_for_answer(page: Any) -> str:
    """The status line once the answer is complete (it ends with the finish reason)."""
    page.wait_for_selector("#pg-status:has-text('finish:')")
    return page.inner_text("#pg-status")


def test_a_json_schema_answer_parses_and_fits_the_schema(ui: Browser) -> None:
    page = ui.playground()
    assert page.is_hidden("#pg-schema") and page.is_hidden("#pg-tools")
    page.select_option("#pg-format", "json_schema")
    page.wait_for_selector("#pg-schema", state="visible")
    assert page.is_checked("#pg-schema-strict")
    # The editor starts with an example schema that is itself valid JSON.
    assert json.loads(page.input_value("#pg-schema"))["type"] == "object"
    page.fill("#pg-schema", json.dumps(DIGIT_SCHEMA, indent=2))
    _settings(page, max_tokens=40)
    page.click("#pg-send")
    status = _wait_for_answer(page)
    assert status.endswith("finish: stop"), status
    answer = page.inner_text("#pg-output")
    jsonschema.validate(json.loads(answer), DIGIT_SCHEMA)
    assert page.inner_text("#pg-check") == "The answer is valid JSON."
    assert page.locator("#pg-calls .tool-call").count() == 0
    [body] = ui.chat_bodies
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": DIGIT_SCHEMA, "strict": True}}
    assert "tools" not in body


def test_json_object_mode_and_a_schema_the_server_rejects(ui: Browser) -> None:
    page = ui.playground()
    page.select_option("#pg-format", "json_object")
    assert page.is_hidden("#pg-schema")
    _settings(page, max_tokens=40, stream=False)
    page.click("#pg-send")
    status = _wait_for_answer(page)
    assert ui.chat_bodies[-1]["response_format"] == {"type": "json_object"}
    if status.endswith("finish: stop"):
        assert isinstance(json.loads(page.inner_text("#pg-output")), dict)
    # JSON, but not a schema the server accepts: its 400 shows as errors always have.
    page.select_option("#pg-format", "json_schema")
    page.fill("#pg-schema", '{"type": "object", "properties": {"a": {"type": "strin"}}}')
    page.click("#pg-send")
    page.wait_for_selector("#pg-status:has-text('400: ')")
    assert "strin" in page.inner_text("#pg-status")
    assert page.is_hidden("#pg-schema-error")
    assert len(ui.chat_bodies) == 2


def test_editors_that_are_not_json_are_reported_inline_and_nothing_is_sent(ui: Browser) -> None:
    page = ui.playground()
    page.select_option("#pg-format", "json_schema")
    page.fill("#pg-schema", '{"type": "object", "properties": {')
    page.fill("#pg-input", "hello")
    page.click("#pg-send")
    page.wait_for_selector("#pg-schema-error", state="visible")
    assert page.inner_text("#pg-schema-error").startswith("The schema is not valid JSON: ")
    assert "Not sent" in page.inner_text("#pg-status")
    # A list is JSON but no schema.
    page.fill("#pg-schema", "[1, 2]")
    page.click("#pg-send")
    assert "must be a JSON object" in page.inner_text("#pg-schema-error")
    # Fixing the editor clears the message as one types.
    page.fill("#pg-schema", json.dumps(DIGIT_SCHEMA))
    page.wait_for_selector("#pg-schema-error", state="hidden")

    page.select_option("#pg-format", "text")
    page.check("#pg-tools-on")
    page.wait_for_selector("#pg-tools", state="visible")
    assert json.loads(page.input_value("#pg-tools"))[0]["function"]["name"] == "get_weather"
    choices = page.eval_on_selector_all("#pg-tool-choice option", "options => options.map(o => o.value)")
    assert choices == ["auto", "required", "none", "function:get_weather"]
    page.fill("#pg-tools", '[{"type": "function", "function": {"name": "get_weather"}')
    page.click("#pg-send")
    page.wait_for_selector("#pg-tools-error", state="visible")
    assert page.inner_text("#pg-tools-error").startswith("The tools are not valid JSON: ")
    page.fill("#pg-tools", '[{"type": "function", "function": {"description": "no name"}}]')
    page.click("#pg-send")
    assert page.inner_text("#pg-tools-error").startswith("tools[0].function.name is missing")
    # The tool_choice list follows the functions the editor names.
    page.fill("#pg-tools", json.dumps([{"type": "function", "function": {"name": "get_time"}}, {"type": "function", "function": {"name": "add"}}]))
    page.wait_for_selector("#pg-tools-error", state="hidden")
    choices = page.eval_on_selector_all("#pg-tool-choice option", "options => options.map(o => o.value)")
    assert choices == ["auto", "required", "none", "function:get_time", "function:add"]
    assert ui.chat_bodies == []


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_offered_tools_come_back_as_tool_call_blocks(ui: Browser, stream: bool) -> None:
    page = ui.playground()
    page.check("#pg-tools-on")
    page.select_option("#pg-tool-choice", "required")
    _settings(page, max_tokens=200, stream=stream)
    page.click("#pg-send")
    status = _wait_for_answer(page)
    [body] = ui.chat_bodies
    assert body["tool_choice"] == "required" and body["tools"][0]["function"]["name"] == "get_weather"
    assert status.endswith("finish: tool_calls"), status
    blocks = page.locator("#pg-calls .tool-call")
    assert blocks.count() >= 1 and f"{blocks.count()} tool call" in status
    for index in range(blocks.count()):
        block = blocks.nth(index)
        assert block.get_attribute("data-name") == "get_weather"
        assert block.locator(".tool-call-name").inner_text() == "get_weather"
        assert block.locator(".tool-call-id").inner_text().startswith("call_")
        arguments = block.locator(".tool-call-arguments").inner_text()
        jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
        assert "\n  " in arguments  # pretty-printed
        assert block.locator(".tool-call-note").is_hidden()
    # The call is not shown as text.
    assert "get_weather" not in page.inner_text("#pg-output")


def test_a_named_tool_choice_is_sent_as_a_function(ui: Browser) -> None:
    page = ui.playground()
    page.check("#pg-tools-on")
    page.select_option("#pg-tool-choice", "function:get_weather")
    _settings(page, max_tokens=200)
    page.click("#pg-send")
    status = _wait_for_answer(page)
    [body] = ui.chat_bodies
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert status.endswith("finish: tool_calls"), status
    assert page.locator("#pg-calls .tool-call[data-name=get_weather]").count() == 1
