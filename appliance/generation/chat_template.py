"""Chat templates: the model's own Jinja2 text (from manifest.json), rendered as transformers does.

Users bring templates written for Hugging Face transformers' `apply_chat_template`, so the
environment matches it: trim_blocks and lstrip_blocks, `{% break %}` / `{% continue %}`,
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape and takes json.dumps's
options, and `tools` / `documents` passed as None when the request has none. Those templates
expect a tool call's `function.arguments` as a dict, while OpenAI clients send a JSON string,
so arguments that are JSON object text are parsed (on copies: the caller's messages are never
changed). Rendering happens in an immutable sandbox: a template can call only what is passed
in, cannot reach Python attributes or write state, and a template error becomes an InvalidInput
for the request, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import InvalidInput, ModelRejected

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
#: The variable a template reads the request's tool definitions from (transformers' name).
TOOLS_VARIABLE = "tools"
#: Jinja2 extensions transformers enables: loopcontrols gives `{% break %}` and `{% continue %}`.
TEMPLATE_EXTENSIONS = ("jinja2.ext.loopcontrols",)
#: What a template's own bug raises for some input (besides TemplateError, which includes the
#: sandbox's SecurityError): a request the template cannot render is the client's 400, not a 500.
RENDER_ERRORS = (TypeError, ValueError, LookupError, ArithmeticError)


def _raise_exception(message: str) -> NoReturn:
    """`raise_exception(message)`: how templates refuse a conversation (roles out of order)."""
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    """`strftime_now(format)`: the local date and time, for templates that state today's date. The
    parameter keeps transformers' name, so a template that passes it by keyword works too."""
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: Jinja2's own escapes HTML characters and ignores json.dumps's options."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """A sandbox with the globals and filters that templates written for transformers call."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=list(TEMPLATE_EXTENSIONS))
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.filters["tojson"] = _tojson
    return environment


def _parsed_arguments(arguments: Any) -> Any:
    """`arguments` as a dict when it is JSON object text (what templates expect), else unchanged."""
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _with_parsed_arguments(tool_call: Any) -> Any:
    """A copy of one OpenAI tool call whose `function.arguments` is parsed; other shapes pass as they are."""
    if not isinstance(tool_call, Mapping) or not isinstance(tool_call.get("function"), Mapping):
        return tool_call
    function = tool_call["function"]
    if "arguments" not in function:
        return tool_call
    return {**tool_call, "function": {**function, "arguments": _parsed_arguments(function["arguments"])}}


def _template_message(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """The message as the template sees it: a copy with parsed tool-call arguments when it has any."""
    tool_calls = message.get("tool_calls")
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
        return message
    return {**message, "tool_calls": [_with_parsed_arguments(tool_call) for tool_call in tool_calls]}


def _check_roles(messages: Sequence[Mapping[str, Any]]) -> None:
    """Refuse an empty conversation or an unknown role before the template sees them."""
    if not messages:
        raise InvalidInput("messages: must contain at least one message", field="messages")
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidInput(
                f"messages[{index}].role: unknown role {role!r} (expected one of {', '.join(sorted(CHAT_ROLES))})",
                field=f"messages[{index}].role",
            )


class ChatTemplate:
    """One model's chat template, compiled once in an immutable Jinja2 sandbox."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        environment = _environment()
        try:
            parsed = environment.parse(source)
            self._template = environment.from_string(parsed)
        except TemplateError as exc:
            raise ModelRejected(f"chat_template does not compile: {exc}", field="chat_template") from None
        self._mentions_tools = TOOLS_VARIABLE in find_undeclared_variables(parsed)
        self._bos = bos_token or ""
        self._eos = eos_token or ""

    @property
    def mentions_tools(self) -> bool:
        """Whether the template reads `tools`; one that does not needs them described in a system message."""
        return self._mentions_tools

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for `messages` (and the request's `tools` / `documents`, None when it has
        none, so `{% if tools %}` is false); InvalidInput names the message that broke the template."""
        _check_roles(messages)
        try:
            return self._template.render(
                messages=[_template_message(message) for message in messages],
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError as exc:
            raise InvalidInput(f"messages: the model's chat template refused them: {exc}", field="messages") from None
        except RENDER_ERRORS as exc:
            raise InvalidInput(f"messages: cannot be rendered with the model's chat template: {exc}", field="messages") from None
