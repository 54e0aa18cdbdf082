"""Reading OpenAI server-sent event streams: framing across network chunks and output-token
counting (the server's usage when it sends one, else one per output-carrying chunk)."""

from __future__ import annotations

import json

import pytest

from appliance.benchmark.sse import SseDecoder, StreamError, StreamTally


def _event(payload: dict) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


def _chat_chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> dict:
    delta: dict = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_decoder_joins_events_split_at_any_byte() -> None:
    stream = _event({"a": 1}) + ": keep-alive comment\n\n" + _event({"b": 2}) + "data: [DONE]\n\n"
    decoder = SseDecoder()
    payloads = []
    for i in range(0, len(stream), 3):
        payloads += decoder.feed(stream[i : i + 3])
    payloads += decoder.close()
    assert payloads == ['{"a": 1}', '{"b": 2}', "[DONE]"]


def test_decoder_handles_crlf_multi_line_data_and_a_missing_final_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed("event: message\r\ndata: first\r\ndata: second\r\n\r\n") == ["first\nsecond"]
    assert decoder.feed("data: tail") == []
    assert decoder.close() == ["tail"]


def test_tally_counts_content_chunks_and_ignores_the_role_only_first_chunk() -> None:
    tally = StreamTally()
    tally.add(json.dumps(_chat_chunk(role="assistant", content="")), 1.0)
    tally.add(json.dumps(_chat_chunk("Hel")), 1.5)
    tally.add(json.dumps(_chat_chunk("lo")), 1.75)
    tally.add(json.dumps(_chat_chunk(" world")), 2.0)
    tally.add(json.dumps(_chat_chunk(finish="length")), 2.1)
    tally.add("[DONE]", 2.2)
    assert tally.chunk_times_s == [1.5, 1.75, 2.0]
    assert tally.output_tokens == 3
    assert tally.finish_reason == "length" and tally.done


def test_tally_prefers_the_servers_usage_count_over_chunk_counting() -> None:
    tally = StreamTally()
    tally.add(json.dumps(_chat_chunk("two tokens")), 0.1)
    tally.add(json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}), 0.2)
    assert tally.content_chunks == 1
    assert tally.output_tokens == 5
    assert tally.usage_prompt_tokens == 11


def test_tally_reads_completions_text_chunks_too() -> None:
    tally = StreamTally()
    tally.add(json.dumps({"choices": [{"index": 0, "text": "abc", "finish_reason": None}]}), 0.3)
    assert tally.output_tokens == 1 and tally.chunk_times_s == [0.3]


def test_an_error_object_in_the_stream_is_a_stream_error() -> None:
    with pytest.raises(StreamError, match="engine stopped"):
        StreamTally().add(json.dumps({"error": {"message": "engine stopped", "type": "server_error"}}), 0.0)


def test_a_chunk_that_is_not_json_is_a_stream_error() -> None:
    with pytest.raises(StreamError, match="not JSON"):
        StreamTally().add("{broken", 0.0)
