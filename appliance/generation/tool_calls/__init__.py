"""Tool-call formats: how models write function calls, and how to read, stream and force them.

A chat model given tools answers in the format it was trained on: Hermes / Qwen wrap each call in
`<tool_call>` tags, Llama 3.1 writes a bare JSON object, Mistral a `[TOOL_CALLS]` list; a model
whose chat template has no tools section is told (in a system message, `describe_tools`) to answer
with a JSON envelope (`generic`). The OpenAI API returns those calls as `message.tool_calls`,
streams them as `delta.tool_calls`, and `tool_choice` = "required" or a named function must force a
call. This module is the one place that knows each format; one small class per format, registered
by name in `FORMATS` (the `tool_parser` setting), in the manner of vLLM's tool parsers.

Contract of every format:
- `parse(text)` never raises: text that is not a well-formed call is content. Forgiving the way
  models are sloppy: any whitespace, `arguments` written as a JSON string holding the object,
  "parameters" instead of "arguments", extra keys in a call object, a missing closing tag or `]`.
- `arguments` is the object as the model wrote it (numbers and string escapes untouched), checked
  to be JSON and with the whitespace between tokens normalised to `json.dumps`' (", " and ": ").
  One incremental reader (`_JsonScanner`) does this for `parse` and for streaming alike, so the
  argument fragments a streamer sends for a call concatenate to exactly what `parse` of the whole
  text gives.
- `streamer()` sends content as soon as it cannot be the start of a call marker, a call's id and
  name as soon as the name is read, and its arguments as they arrive. A call found malformed after
  its name was sent stays as sent (it cannot be taken back); `parse` of the same text makes it
  content.
- `grammar(functions, parallel=..., special_tokens=...)` is an llguidance grammar forcing one call
  (or one or more) to one of `functions`, arguments valid against its parameters. A marker the
  serving tokenizer holds as a special token must be named by its id: llguidance never matches a
  special token against literal text (it even fast-forwards the marker's special token and then
  rejects it). So pass `special_token_ids(tokenizer.json text)` of the serving model (computed
  once per model); without it markers are literal text, right only for tokenizers without them.
- `auto_grammar(...)` (tool_choice "auto") allows text but forces a valid call once one starts,
  where the first characters tell (generic); None for the formats that cannot tell.
- `function_specs(tools)` turns the request's OpenAI tool dicts into FunctionSpecs.

Modules: base.py (the contract and the registry), json_reader.py (incremental JSON), streaming.py
(the shared streamer), grammars.py (llguidance grammars, tool descriptions), formats.py (the
formats). Never imports onnxruntime, torch or transformers.
"""

from appliance.generation.tool_calls import formats as _formats  # noqa: F401 - registers the formats
from appliance.generation.tool_calls.base import (
    DEFAULT_FORMAT,
    FORMATS,
    FunctionSpec,
    ParsedOutput,
    SpecialTokens,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamer,
    detect_format,
    function_specs,
    register,
    special_token_ids,
    tool_format,
)

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "FunctionSpec",
    "ParsedOutput",
    "SpecialTokens",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStreamer",
    "detect_format",
    "function_specs",
    "register",
    "special_token_ids",
    "tool_format",
]
