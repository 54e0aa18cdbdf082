"""OpenAI tool calling on `/v1/chat/completions`: what the request allows, what the model said.

`plan_tools` reads `tools`, `tool_choice` and `parallel_tool_calls` once: which tools the chat
template sees, whether the answer is parsed for calls, and, for `required` or a named
function, the grammar (in the model's own tool-call format) that makes the answer a valid
call. `auto` lets the model choose; where the format can tell a call from its first characters
(generic), a call once started is forced to be valid too. The model's text becomes
`message.tool_calls` (`calls_message`) or, streamed, `delta.tool_calls` fragments (`ToolStream`:
index, id and name first, then argument pieces), the way the `openai` client's stream
helpers accumulate them. Never imports the engines: the formats come through serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.api.openai_chat_schemas import (
    ChatCompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCallDeltaOut,
    ToolCallOut,
)
from appliance.errors import InvalidInput
from appliance.serving.protocols import (
    Constraint,
    FunctionSpec,
    GenerationClient,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamer,
    function_specs,
)


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request does with tools."""

    #: OpenAI tool dicts for the chat template (None: the prompt mentions no tools).
    template_tools: list[dict[str, Any]] | None = None
    #: Parse the answer for calls.
    parse: bool = False
    #: Grammar forcing a call (tool_choice required or a named function).
    constraint: Constraint | None = None
    functions: list[FunctionSpec] = field(default_factory=list)


def plan_tools(body: ChatCompletionRequest, client: GenerationClient) -> ToolPlan:
    """Check the tool fields against each other; InvalidInput names the offending one."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidInput("tool_choice: requires tools", field="tool_choice")
        return ToolPlan()
    names = [tool.function.name for tool in body.tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInput(f"tools: function names must be unique; repeated: {', '.join(duplicates)}", field="tools")
    if choice == "none":
        return ToolPlan()
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    functions = function_specs(tools)
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        chosen = [function for function in functions if function.name == choice.function.name]
        if not chosen:
            raise InvalidInput(
                f"tool_choice: no tool named {choice.function.name!r} (tools: {', '.join(names)})", field="tool_choice"
            )
        grammar = client.tool_grammar(chosen, parallel=False)
        return ToolPlan(tools, True, Constraint("grammar", grammar, field="tools"), functions)
    if choice == "required":
        grammar = client.tool_grammar(functions, parallel=parallel)
        return ToolPlan(tools, True, Constraint("grammar", grammar, field="tools"), functions)
    auto = client.tool_grammar(functions, parallel=parallel, auto=True)
    return ToolPlan(tools, True, Constraint("grammar", auto, field="tools") if auto is not None else None, functions)


def calls_message(fmt: ToolCallFormat, text: str) -> tuple[str | None, list[ToolCallOut]]:
    """The finished answer as content and tool calls."""
    parsed = fmt.parse(text)
    calls = [ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)) for call in parsed.calls]
    if not calls:
        return text, []
    return parsed.content, calls


class ToolStream:
    """One streamed choice's text through the format's streamer: content to send now and
    tool-call fragments."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self._streamer: ToolCallStreamer = fmt.streamer()
        self.made_calls = False

    def push(self, text: str) -> tuple[str, list[ToolCallDeltaOut]]:
        content, deltas = self._streamer.push(text)
        return content, self._out(deltas)

    def finish(self) -> tuple[str, list[ToolCallDeltaOut]]:
        content, deltas = self._streamer.finish()
        return content, self._out(deltas)

    def _out(self, deltas: list[ToolCallDelta]) -> list[ToolCallDeltaOut]:
        if deltas:
            self.made_calls = True
        return [
            ToolCallDeltaOut(
                index=delta.index,
                id=delta.id,
                type="function" if delta.id is not None else None,
                function=FunctionCallDelta(name=delta.name, arguments=delta.arguments),
            )
            for delta in deltas
        ]
