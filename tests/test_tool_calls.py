"""Tool-call formats (appliance.generation.tool_calls): parsing finished replies, streaming
them in pieces (the fragments must add up to what parse gives), and the llguidance grammars
that force a call, driven token by token with llguidance's real matcher over a small byte-level
BPE tokenizer, once with the call markers as plain text and once as added special tokens."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer

from appliance.errors import InvalidInput
from appliance.generation.tool_calls import (
    FORMATS,
    FunctionSpec,
    ParsedOutput,
    ToolCallDelta,
    ToolCallFormat,
    detect_format,
    function_specs,
    special_token_ids,
    tool_format,
)
from tests.helpers.decoders import IM_END, build_tokenizer

WEATHER = FunctionSpec(
    "get_weather",
    "Current weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    strict=True,
)
ADD = FunctionSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)
#: No declared parameters: any object is valid, so the walk has to find its own way out.
PING = FunctionSpec("ping", None, {"type": "object", "properties": {}})
#: Local references must still resolve once the parameters sit inside the call schema.
PAINT = FunctionSpec(
    "paint",
    "Paint the wall.",
    {
        "type": "object",
        "properties": {
            "colour": {"$ref": "#/$defs/colour"},
            "coats": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "finish": {"enum": ["matt } {", 'gl\u00e4nzend "hoch"']},
        },
        "required": ["colour"],
        "additionalProperties": False,
        "$defs": {"colour": {"enum": ["red", "blue"]}},
    },
)
FUNCTIONS = [WEATHER, ADD, PING, PAINT]
PARAMETERS = {function.name: function.parameters for function in FUNCTIONS}

#: Markers some tokenizers hold as single added tokens.
MARKERS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"]
#: Random walks per (format, tokenizer, named or required, parallel or not).
WALKS = 10
#: Chance of ending a walk whenever end-of-sequence is allowed (parallel calls can go on).
STOP_CHANCE = 0.5
#: Tokens after which a walk prefers tokens that close a string, object or list.
STEER_AFTER = 120
#: A walk longer than this is a grammar that does not end.
WALK_LIMIT = 2000
CLOSERS = (b'"', b"}", b"]")
#: Random piece sizes for streaming (1-character pieces are run separately).
MAX_PIECE = 7
SEED = 20240607


def _tokenizer_json(special: bool) -> str:
    """tokenizer.json text of a small byte-level BPE tokenizer; `special`: the call markers are
    added special tokens."""
    tokenizer = build_tokenizer()
    if special:
        tokenizer.add_special_tokens(MARKERS)
    return tokenizer.to_str()


def _tokenizer(special: bool) -> tuple[LLTokenizer, dict[str, int]]:
    """llguidance's tokenizer and the special tokens `grammar` needs, from one tokenizer.json."""
    text = _tokenizer_json(special)
    added = {token["content"]: token["id"] for token in json.loads(text)["added_tokens"]}
    return LLTokenizer(text, eos_token=added[IM_END]), special_token_ids(text)


@pytest.fixture(scope="module", params=[False, True], ids=["text-markers", "special-markers"])
def tokenizer(request: pytest.FixtureRequest) -> tuple[LLTokenizer, dict[str, int]]:
    return _tokenizer(request.param)


def _allowed(matcher: LLMatcher, vocab_size: int) -> list[int]:
    """Token ids the mask allows: bit i of the little-endian 32-bit words is token i."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size]).tolist()


def random_walk(tokenizer: LLTokenizer, grammar: str, rng: random.Random) -> str:
    """Generate with random allowed tokens (and the forced ones) until the grammar ends."""
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    eos, tokens = tokenizer.eos_token, []
    while not matcher.is_stopped():
        assert len(tokens) < WALK_LIMIT, tokenizer.decode_str(tokens)
        forced = matcher.compute_ff_tokens()
        if forced:
            assert matcher.consume_tokens(forced), matcher.get_error()
            tokens += forced
            continue
        allowed = _allowed(matcher, tokenizer.vocab_size)
        if eos in allowed and (allowed == [eos] or rng.random() < STOP_CHANCE):
            break
        choices = [token for token in allowed if token != eos]
        if len(tokens) > STEER_AFTER:
            closing = [token for token in choices if any(c in tokenizer.decode_bytes([token]) for c in CLOSERS)]
            choices = closing or choices
        token = rng.choice(choices)
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    assert matcher.is_accepting()
    return tokenizer.decode_str(tokens)


def _calls(parsed: ParsedOutput) -> list[tuple[str, Any]]:
    return [(call.name, json.loads(call.arguments)) for call in parsed.calls]


# --- Registry and detection -------------------------------------------------------------------


def test_registry_holds_every_format_under_its_name() -> None:
    assert set(FORMATS) == {"hermes", "llama3_json", "mistral", "generic"}
    for name, cls in FORMATS.items():
        assert cls.name == name
        assert tool_format(name).name == name


def test_unknown_format_is_invalid_input_naming_tool_parser() -> None:
    with pytest.raises(InvalidInput) as caught:
        tool_format("nope")
    assert caught.value.field == "tool_parser"
    assert "hermes" in caught.value.message


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, "generic"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "generic"),
        ("{% if tools %}<tools>{{ tools | tojson }}</tools> reply in <tool_call></tool_call> tags{% endif %}", "hermes"),
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{{ '[TOOL_CALLS]' }}", "mistral"),
        ("{{ '<|python_tag|>' + tool_call | tojson }}", "llama3_json"),
        ("{% if message.role == 'ipython' %}{{ '<|start_header_id|>ipython<|end_header_id|>' }}{% endif %}", "llama3_json"),
        ("{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and value}.' }}", "llama3_json"),
    ],
)
def test_detect_format_from_chat_template(template: str | None, expected: str) -> None:
    assert detect_format(template) == expected


# --- Parsing ----------------------------------------------------------------------------------

WEATHER_ARGS = {"city": "Paris", "unit": "celsius"}
TRICKY_ARGS = {"q": 'caf\u00e9 "quoted" \\ </tool_call> [TOOL_CALLS] {', "n": -1.5e3, "l": [1, {"b": None}], "t": True, "e": {}}


def test_hermes_parses_content_and_calls() -> None:
    hermes = tool_format("hermes")
    text = (
        "Let me check.\n<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": WEATHER_ARGS}) + "\n</tool_call>\n"
        "<tool_call>\n" + json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}}) + "\n</tool_call>"
    )
    parsed = hermes.parse(text)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", WEATHER_ARGS), ("add", {"a": 1, "b": 2})]
    assert parsed.calls[0].arguments == json.dumps(WEATHER_ARGS)
    assert all(call.id.startswith("call_") and len(call.id) == len("call_") + 24 for call in parsed.calls)
    assert len({call.id for call in parsed.calls}) == 2


def test_hermes_forgives_what_models_do() -> None:
    hermes = tool_format("hermes")
    # Arguments as a JSON string, odd whitespace, no closing tag at the end.
    parsed = hermes.parse('<tool_call>{ "name" : "add" ,\n "arguments" : "{\\"a\\":1,\\"b\\":2}" }')
    assert parsed.content is None
    assert [(call.name, call.arguments) for call in parsed.calls] == [("add", '{"a": 1, "b": 2}')]
    # Name after the arguments, "parameters" for "arguments", extra keys.
    parsed = hermes.parse('<tool_call>{"parameters": {"a": 1}, "type": "function", "name": "add"}</tool_call>')
    assert _calls(parsed) == [("add", {"a": 1})]
    # No arguments at all.
    assert hermes.parse('<tool_call>{"name": "ping"}</tool_call>').calls[0].arguments == "{}"
    # Markers and braces inside strings do not end anything.
    parsed = hermes.parse('<tool_call>{"name": "f", "arguments": ' + json.dumps(TRICKY_ARGS, ensure_ascii=False) + "}</tool_call>")
    assert _calls(parsed) == [("f", TRICKY_ARGS)]
    assert parsed.calls[0].arguments == json.dumps(TRICKY_ARGS, ensure_ascii=False)


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
        '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": 5}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 01}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": [1,]}}</tool_call>',
        "<tool_call>{\"name\": \"f\", \"arguments\": {'a': 1}}</tool_call>",
        '<tool_call>{"name": "f", "arguments": {"a": "tab\there"}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": "\\x"}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 1}',  # cut off
        "I will call <tool_",
    ],
)
def test_hermes_malformed_calls_are_content(text: str) -> None:
    assert tool_format("hermes").parse(text) == ParsedOutput(content=text.strip(), calls=[])


def test_llama3_json_parses_calls_and_content() -> None:
    llama = tool_format("llama3_json")
    call = {"name": "get_weather", "parameters": WEATHER_ARGS}
    assert _calls(llama.parse(json.dumps(call))) == [("get_weather", WEATHER_ARGS)]
    assert _calls(llama.parse("<|python_tag|>" + json.dumps(call))) == [("get_weather", WEATHER_ARGS)]
    both = json.dumps(call) + "; " + json.dumps({"name": "add", "parameters": {"a": 1, "b": 2}})
    assert _calls(llama.parse(both)) == [("get_weather", WEATHER_ARGS), ("add", {"a": 1, "b": 2})]
    assert len(llama.parse(both.replace("; ", "\n")).calls) == 2
    assert _calls(llama.parse('{"name": "add", "arguments": {"a": 3}}')) == [("add", {"a": 3})]
    parsed = llama.parse("Checking now. <|python_tag|>" + json.dumps(call))
    assert parsed.content == "Checking now." and len(parsed.calls) == 1
    for content in ["The answer is 42.", "{not json", "<|python_tag|>print('hi')", "Use {\"name\": \"x\"} like this"]:
        assert llama.parse(content) == ParsedOutput(content=content, calls=[])


def test_mistral_parses_the_call_list() -> None:
    mistral = tool_format("mistral")
    calls = [{"name": "get_weather", "arguments": WEATHER_ARGS}, {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})}]
    parsed = mistral.parse("Sure.\n[TOOL_CALLS] " + json.dumps(calls))
    assert parsed.content == "Sure."
    assert _calls(parsed) == [("get_weather", WEATHER_ARGS), ("add", {"a": 1, "b": 2})]
    assert _calls(mistral.parse("[TOOL_CALLS]" + json.dumps(calls)[:-1])) == _calls(parsed)  # no "]"
    assert _calls(mistral.parse("[TOOL_CALLS]" + json.dumps(calls[0]))) == [("get_weather", WEATHER_ARGS)]  # no list
    for content in ["[TOOL_CALLS] hello", "[TOOL_CALLS] [oops]", "no calls here [TOOL_CALL"]:
        assert mistral.parse(content) == ParsedOutput(content=content, calls=[])


def test_generic_parses_the_envelope_or_leaves_content() -> None:
    generic = tool_format("generic")
    envelope = {"tool_calls": [{"name": "get_weather", "arguments": WEATHER_ARGS}, {"name": "add", "arguments": '{"a": 1, "b": 2}'}]}
    expected = [("get_weather", WEATHER_ARGS), ("add", {"a": 1, "b": 2})]
    assert _calls(generic.parse(json.dumps(envelope))) == expected
    assert _calls(generic.parse("```json\n" + json.dumps(envelope, indent=2) + "\n```\n")) == expected
    assert generic.parse(json.dumps(envelope)).content is None
    not_calls = ['{"tool_calls": []}', '{"answer": 42}', '{"tool_calls": [{"name": "f"}, 3]}', "{oops", "```python\nx = 1\n```"]
    for content in ["Hello there.", *not_calls]:
        assert generic.parse(content) == ParsedOutput(content=content, calls=[])


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\té€😀<>{}[],:') for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.randint(-(10**12), 10**12)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{index}": _random_json(rng, depth + 1) for index in range(rng.randint(0, 3))}


def test_arguments_are_normalised_to_json_dumps_layout() -> None:
    """However the model spaced its JSON, the arguments text is `json.dumps`' layout."""
    rng = random.Random(SEED)
    hermes = tool_format("hermes")
    for _ in range(200):
        arguments = {f"p{index}": _random_json(rng) for index in range(rng.randint(0, 4))}
        layout = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"separators": (" ,\n", " :\t")}])
        written = json.dumps({"name": "f", "arguments": arguments}, ensure_ascii=False, **layout)
        parsed = hermes.parse(f"<tool_call>{written}</tool_call>")
        assert [call.arguments for call in parsed.calls] == [json.dumps(arguments, ensure_ascii=False)]


# --- Streaming --------------------------------------------------------------------------------

STREAM_TEXTS: dict[str, list[str]] = {
    "hermes": [
        "Let me check the weather.\n<tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": WEATHER_ARGS})
        + "\n</tool_call>\n<tool_call>\n"
        + json.dumps({"name": "f", "arguments": TRICKY_ARGS}, ensure_ascii=False)
        + "\n</tool_call>",
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>\n\nDone <tool_ here.',
        '<tool_call>{"arguments": {"a": [1, 2.5e-3, true]}, "name": "add"}',
        'Text <tool_call> then {"x": 1} <tool_call>{"name": "ping", "arguments": {}}</tool_call> <tool_',
        "No calls at all, just < and <tool and </tool_call>.",
        "<tool_call>oops</tool_call>",
    ],
    "llama3_json": [
        json.dumps({"name": "get_weather", "parameters": WEATHER_ARGS}),
        "  <|python_tag|>"
        + json.dumps({"name": "add", "parameters": {"a": 1, "b": 2}})
        + "; "
        + json.dumps({"name": "f", "parameters": TRICKY_ARGS}, ensure_ascii=False)
        + ";\n",
        "I will call it. <|python_tag|>" + json.dumps({"name": "ping", "parameters": {}}) + " and that is all.",
        "The answer is < 42 >, <|python",
        "{not a call",
    ],
    "mistral": [
        "[TOOL_CALLS] " + json.dumps([{"name": "get_weather", "arguments": WEATHER_ARGS}, {"name": "f", "arguments": TRICKY_ARGS}]),
        "Sure.\n[TOOL_CALLS][" + json.dumps({"name": "add", "arguments": '{"a": 1, "b": 2}'}),
        "Brackets [like [TOOL these] and [TOOL_CALLS] oops",
    ],
    "generic": [
        json.dumps({"tool_calls": [{"name": "get_weather", "arguments": WEATHER_ARGS}, {"name": "f", "arguments": TRICKY_ARGS}]}),
        "```json\n" + json.dumps({"tool_calls": [{"name": "ping", "arguments": {}}]}) + "\n```",
        "Plain answer with {braces} and ```fences```.",
        '{"answer": 42}',
    ],
}


def _pieces(text: str, rng: random.Random | None) -> list[str]:
    """`text` cut into random pieces (1-character pieces when `rng` is None)."""
    if rng is None:
        return list(text)
    pieces, position = [], 0
    while position < len(text):
        size = rng.randint(1, MAX_PIECE)
        pieces.append(text[position : position + size])
        position += size
    return pieces


def _stream(fmt: ToolCallFormat, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    streamer = fmt.streamer()
    content, deltas = [], []
    for piece in pieces:
        sent, new = streamer.push(piece)
        content.append(sent)
        deltas += new
    sent, new = streamer.finish()
    return "".join(content) + sent, deltas + new


@pytest.mark.parametrize("name", sorted(STREAM_TEXTS))
def test_streamed_fragments_add_up_to_parse(name: str) -> None:
    fmt = tool_format(name)
    rng = random.Random(SEED)
    for text in STREAM_TEXTS[name]:
        parsed = fmt.parse(text)
        for cut in [None, *(rng for _ in range(5))]:
            content, deltas = _stream(fmt, _pieces(text, cut))
            assert (content.strip() or None) == parsed.content, text
            indexes = sorted({delta.index for delta in deltas})
            assert indexes == list(range(len(parsed.calls))), text
            for index, call in enumerate(parsed.calls):
                fragments = [delta for delta in deltas if delta.index == index]
                assert fragments[0].id is not None and fragments[0].name == call.name
                assert all(delta.id is None and delta.name is None for delta in fragments[1:])
                assert "".join(delta.arguments for delta in fragments) == call.arguments


#: Pieces of garbage replies: markers, JSON punctuation and words in random order.
GARBAGE = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```", "{", "}", "[", "]", '"', "\\", ":", ",", ";",
           '"name"', '"arguments"', '"f"', "1", "true", " ", "\n", "text", "<tool", "[TOOL"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_garbage_never_raises_and_calls_are_always_json_objects(name: str) -> None:
    fmt = tool_format(name)
    rng = random.Random(SEED)
    for _ in range(300):
        text = "".join(rng.choice(GARBAGE) for _ in range(rng.randint(1, 30)))
        parsed = fmt.parse(text)
        assert all(isinstance(json.loads(call.arguments), dict) for call in parsed.calls)
        content, deltas = _stream(fmt, _pieces(text, rng))
        if not deltas:  # nothing was taken for a call: everything is content, as parse says
            assert (content.strip() or None) == parsed.content and not parsed.calls


def test_streaming_sends_early_and_holds_back_marker_starts() -> None:
    streamer = tool_format("hermes").streamer()
    assert streamer.push("Hello <tool_") == ("Hello ", [])
    assert streamer.push("call>\n{") == ("", [])
    content, deltas = streamer.push('"name": "add", "arguments": {"a": 12')
    assert content == "" and [(delta.index, delta.name, delta.arguments) for delta in deltas] == [(0, "add", ""), (0, None, '{"a": ')]
    assert streamer.push(", ")[1] == [ToolCallDelta(index=0, arguments="12, ")]
    assert streamer.push('"b": 3}}\n</tool_call>\n') == ("", [ToolCallDelta(index=0, arguments='"b": 3}')])
    assert streamer.finish() == ("", [])
    assert tool_format("hermes").streamer().push("a <tools>") == ("a <tools>", [])


def test_generic_streams_plain_answers_and_holds_envelopes() -> None:
    streamer = tool_format("generic").streamer()
    assert streamer.push("  ") == ("", [])
    assert streamer.push("Hi there") == ("  Hi there", [])
    held = tool_format("generic").streamer()
    assert held.push('{"tool_calls": [{"name": "ping", "arguments": {}}]}') == ("", [])
    content, deltas = held.finish()
    assert content == "" and [(delta.name, delta.arguments) for delta in deltas] == [("ping", ""), (None, "{}")]


# --- Grammars ---------------------------------------------------------------------------------


def _check_walk(fmt: ToolCallFormat, text: str, functions: list[FunctionSpec], parallel: bool, rng: random.Random) -> None:
    """The generated reply parses to valid calls only, and streams to the same calls."""
    parsed = fmt.parse(text)
    assert parsed.content is None, text
    assert parsed.calls and (parallel or len(parsed.calls) == 1), text
    for call in parsed.calls:
        assert call.name in {function.name for function in functions}, text
        jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
    content, deltas = _stream(fmt, _pieces(text, rng))
    assert not content.strip()
    streamed = [(delta.name, "".join(more.arguments for more in deltas if more.index == delta.index)) for delta in deltas if delta.name]
    assert streamed == [(call.name, call.arguments) for call in parsed.calls]


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("named", [False, True], ids=["required", "named"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_grammar_forces_parseable_valid_calls(
    name: str, named: bool, parallel: bool, tokenizer: tuple[LLTokenizer, dict[str, int]]
) -> None:
    fmt = tool_format(name)
    matcher_tokenizer, special_tokens = tokenizer
    rng = random.Random(f"{SEED}-{name}-{named}-{parallel}")
    for walk in range(WALKS):
        functions = [FUNCTIONS[walk % len(FUNCTIONS)]] if named else FUNCTIONS
        grammar = fmt.grammar(functions, parallel=parallel, special_tokens=special_tokens)
        assert LLMatcher.validate_grammar(grammar, matcher_tokenizer) == ""
        _check_walk(fmt, random_walk(matcher_tokenizer, grammar, rng), functions, parallel, rng)


def test_special_markers_are_named_by_token_id() -> None:
    """llguidance never matches a special token against literal text: with `<tool_call>` an
    added token, a grammar that spells the marker out breaks the matcher at its first token,
    which is why `grammar` takes the serving tokenizer's special tokens."""
    (special, special_ids), (_, plain_ids) = _tokenizer(True), _tokenizer(False)
    assert plain_ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert set(special_ids) == {*plain_ids, *MARKERS}
    assert all(special.is_special_token(token) for token in special_ids.values())  # llguidance agrees
    hermes = tool_format("hermes")
    assert "<[" not in hermes.grammar(FUNCTIONS, parallel=False, special_tokens=plain_ids)
    literal = LLMatcher(special, hermes.grammar(FUNCTIONS, parallel=False), log_level=0)
    forced = literal.compute_ff_tokens()
    assert not (literal.consume_tokens(forced) if forced else literal.consume_token(_allowed(literal, special.vocab_size)[0]))
    rng = random.Random(SEED)
    text = random_walk(special, hermes.grammar(FUNCTIONS, parallel=False, special_tokens=special_ids), rng)
    assert text.startswith("<tool_call>\n{")
    mistral_grammar = tool_format("mistral").grammar([ADD], parallel=True, special_tokens=special_ids)
    assert random_walk(special, mistral_grammar, rng).startswith('[TOOL_CALLS] [{"name": "add", "arguments": {')


def test_function_specs_from_openai_tools() -> None:
    tools = [
        {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": ADD.parameters, "strict": True}},
        {"type": "function", "function": {"name": "ping"}},
    ]
    assert function_specs(tools) == [
        FunctionSpec("add", "Add.", ADD.parameters, strict=True),
        FunctionSpec("ping", None, {"type": "object", "properties": {}}),
    ]
    not_functions = [
        {"type": "retrieval"},
        {"type": "function", "function": {}},
        {"type": "function", "function": {"name": "f", "parameters": []}},
    ]
    for bad in not_functions:
        with pytest.raises(InvalidInput) as caught:
            function_specs([bad])
        assert caught.value.field == "tools"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_grammar_validates_without_a_tokenizer(name: str) -> None:
    for parallel in (False, True):
        assert LLMatcher.validate_grammar(tool_format(name).grammar(FUNCTIONS, parallel=parallel)) == ""


def test_strict_functions_refuse_keywords_the_matcher_cannot_enforce() -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    hermes = tool_format("hermes")
    assert LLMatcher.validate_grammar(hermes.grammar([FunctionSpec("t", None, schema)], parallel=False)) == ""
    assert LLMatcher.validate_grammar(hermes.grammar([FunctionSpec("t", None, schema, strict=True)], parallel=False)) != ""


def test_grammar_needs_a_function() -> None:
    with pytest.raises(InvalidInput) as caught:
        tool_format("hermes").grammar([], parallel=False)
    assert caught.value.field == "tools"


# --- Describing tools -------------------------------------------------------------------------

SYNTAX: dict[str, Callable[[str], bool]] = {
    "hermes": lambda text: "<tool_call>" in text and '"arguments"' in text,
    "llama3_json": lambda text: '"parameters"' in text,
    "mistral": lambda text: "[TOOL_CALLS]" in text,
    "generic": lambda text: '{"tool_calls": [{"name"' in text and "only this JSON object" in text and "answer normally" in text,
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_describe_tools_lists_every_function_and_the_call_syntax(name: str) -> None:
    text = tool_format(name).describe_tools(FUNCTIONS)
    for function in FUNCTIONS:
        assert function.name in text
        assert json.dumps(function.parameters, ensure_ascii=False) in text
        assert function.description is None or function.description in text
    assert SYNTAX[name](text)


def test_generic_auto_grammar_allows_text_but_holds_a_started_call_to_the_envelope() -> None:
    """tool_choice "auto": a reply opening with "{" must become a valid call; anything else is free."""
    fmt = tool_format("generic")
    grammar = fmt.auto_grammar(FUNCTIONS, parallel=True)
    assert grammar is not None and LLMatcher.validate_grammar(grammar) == ""
    llg_tokenizer, _ = _tokenizer(False)
    matcher = LLMatcher(llg_tokenizer, grammar, log_level=0)
    assert matcher.consume_tokens(llg_tokenizer.tokenize_str("Sure, here it is")), matcher.get_error()
    rng = random.Random(SEED)
    for _ in range(WALKS):
        text = random_walk(llg_tokenizer, grammar, rng)
        assert not text.lstrip().startswith("{") or fmt.parse(text).calls, text
    started = LLMatcher(llg_tokenizer, grammar, log_level=0)
    assert started.consume_tokens(llg_tokenizer.tokenize_str('{"tool_calls": [{"name": "'))
    assert started.validate_tokens(llg_tokenizer.tokenize_str('bogus"')) < len(llg_tokenizer.tokenize_str('bogus"'))
    rest = 'ping", "arguments": {}}]}'
    assert started.consume_tokens(llg_tokenizer.tokenize_str(rest)), started.get_error()
    assert started.is_accepting()
    assert all(tool_format(name).auto_grammar(FUNCTIONS, parallel=False) is None for name in ("hermes", "llama3_json", "mistral"))
