"""llguidance grammars that force a valid call, and the tool descriptions formats write.

A call object is an anyOf over the functions, each function's parameters moved under $defs so
its own "#/..." references still resolve; markers the serving tokenizer holds as special tokens
are named by id (llguidance never matches a special token against literal text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from llguidance import LLMatcher

from appliance.errors import InvalidInput
from appliance.generation.tool_calls.base import EMPTY_PARAMETERS, FunctionSpec, JSON_LAYOUT, SpecialTokens

# --- Grammars and descriptions ----------------------------------------------------------------


def marker_item(marker: str, special_tokens: SpecialTokens) -> str:
    """A marker as a grammar item: the special token's id when the tokenizer holds the marker
    as one (llguidance never matches a special token against literal text), else the text."""
    token = special_tokens.get(marker)
    return json.dumps(marker) if token is None else f"<[{token}]>"


def _rerooted(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local references ("#/...") point below `base`, where the copy
    will live in a larger schema."""
    if isinstance(schema, dict):
        return {
            key: base + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#") else _rerooted(value, base)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rerooted(value, base) for value in schema]
    return schema


def calls_schema(functions: Sequence[FunctionSpec], arguments_key: str, wrap: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """The %json item for calls: `wrap` places the schema of one call object (an anyOf over the
    functions) in the format's surroundings. Each function's parameters live under $defs, so
    their own "#/..." references still resolve."""
    if not functions:
        raise InvalidInput("forcing a tool call needs at least one function", field="tools")
    definitions: dict[str, Any] = {}
    options = []
    for number, function in enumerate(functions):
        key = f"function{number}"
        definitions[key] = _rerooted(function.parameters or EMPTY_PARAMETERS, f"#/$defs/{key}")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.name}, arguments_key: {"$ref": f"#/$defs/{key}"}},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    layout = {**JSON_LAYOUT, "lenient": not all(function.strict for function in functions)}
    schema = {**wrap({"anyOf": options}), "$defs": definitions, "x-guidance": layout}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def one_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call object on its own, unwrapped."""
    return call


def calls_list(call: dict[str, Any], *, parallel: bool) -> dict[str, Any]:
    """A JSON list of calls: one, or one or more."""
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def lark_grammar(start: str, body: str) -> str:
    """A compiled grammar: `start` built around the rule `body` (the JSON part)."""
    return LLMatcher.grammar_from_lark(f"%llguidance {{}}\nstart: {start}\nbody: {body}\n")


def tool_json(function: FunctionSpec) -> str:
    """A function as OpenAI's tool JSON, one line."""
    body: dict[str, Any] = {"name": function.name}
    if function.description:
        body["description"] = function.description
    body["parameters"] = function.parameters or EMPTY_PARAMETERS
    return json.dumps({"type": "function", "function": body}, ensure_ascii=False)
