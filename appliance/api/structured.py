"""What shape a generation request asks its answer to take, as one `Constraint` (or none).

OpenAI's `response_format` (text, json_object, json_schema) and vLLM's `structured_outputs`
(json, regex, choice) describe the same thing in two shapes; a request may use one of them.
Tool calling (`tool_choice` required or a named function) is the other source of a grammar;
it cannot be combined with these. The constraint is compiled by the model's GenerationClient
(errors name the field here); this module only reads the request. Never imports the engines.
"""

from __future__ import annotations

import json

from appliance.api.openai_chat_schemas import (
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    StructuredOutputs,
    TextFormat,
    SamplingFields,
)
from appliance.errors import InvalidInput
from appliance.serving.protocols import Constraint


def requested_constraint(body: SamplingFields) -> Constraint | None:
    """The request's output constraint; InvalidInput when it asks for two at once."""
    fmt = body.response_format
    outputs = body.structured_outputs
    from_format = None if fmt is None or isinstance(fmt, TextFormat) else _from_response_format(fmt)
    from_outputs = _from_structured_outputs(outputs) if outputs is not None else None
    if from_format is not None and from_outputs is not None:
        raise InvalidInput("structured_outputs: cannot be combined with a response_format other than text", field="structured_outputs")
    return from_format or from_outputs


def _from_response_format(fmt: JsonObjectFormat | JsonSchemaResponseFormat) -> Constraint:
    if isinstance(fmt, JsonObjectFormat):
        return Constraint("json_object", "", field="response_format")
    schema = fmt.json_schema.schema_
    if schema is None:
        return Constraint("json_object", "", field="response_format")
    return Constraint("json_schema", json.dumps(schema), strict=bool(fmt.json_schema.strict), field="response_format")


def _from_structured_outputs(outputs: StructuredOutputs) -> Constraint:
    given = [name for name, value in (("json", outputs.json_), ("regex", outputs.regex), ("choice", outputs.choice)) if value is not None]
    if len(given) != 1:
        raise InvalidInput("structured_outputs: give exactly one of json, regex or choice", field="structured_outputs")
    if outputs.json_ is not None:
        return Constraint("json_schema", json.dumps(outputs.json_), field="structured_outputs.json")
    if outputs.regex is not None:
        return Constraint("regex", outputs.regex, field="structured_outputs.regex")
    return Constraint("choice", json.dumps(outputs.choice), field="structured_outputs.choice")
