"""Workloads and the load generator's safety rules: what is sent, and where it may be sent."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from appliance.benchmark.safety import MAX_REQUESTS_PER_POINT_CAP, check_bounds, check_sweep, check_target
from appliance.benchmark.workloads import (
    ChatWorkload,
    EmbeddingsWorkload,
    InferWorkload,
    load_prompts,
    parse_prompts,
    parse_range,
)
from appliance.errors import InvalidInput


def test_the_shipped_prompt_set_has_forty_varied_prompts_with_output_lengths() -> None:
    prompts, source = load_prompts(None)
    assert source.startswith("shipped:")
    assert len(prompts) == 40
    lengths = {len(p.text) for p in prompts}
    assert min(lengths) < 40 and max(lengths) > 300
    assert all(p.max_tokens and p.max_tokens >= 16 for p in prompts)


def test_a_user_jsonl_may_give_prompts_or_messages(tmp_path: Path) -> None:
    path = tmp_path / "work.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 4}\n\n{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]}\n')
    prompts, _ = load_prompts(path)
    assert [p.max_tokens for p in prompts] == [4, None]
    assert prompts[1].messages[0]["role"] == "system" and prompts[1].text == "why?"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "work.jsonl:1: not JSON"),
        ('["a"]', "must be a JSON object"),
        ('{"prompt": ""}', "needs a non-empty 'prompt'"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be a positive integer"),
        ('{"messages": [{"role": "user"}]}', "messages must be a non-empty list"),
    ],
)
def test_a_malformed_workload_line_is_named_by_file_and_line(line: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_prompts(line, "work.jsonl")


def test_an_empty_or_missing_workload_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no prompts"):
        parse_prompts("\n\n", "empty.jsonl")
    with pytest.raises(InvalidInput, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def test_chat_requests_stream_with_usage_and_take_output_length_from_the_range() -> None:
    prompts, source = load_prompts(None)
    workload = ChatWorkload(model="llm", prompts=prompts, source=source, output_tokens=(8, 12))
    rng = random.Random(1)
    calls = [workload.next_call(rng) for _ in range(50)]
    assert all(c.path == "/v1/chat/completions" and c.stream for c in calls)
    assert all(c.body["stream_options"] == {"include_usage": True} for c in calls)
    assert {c.body["max_tokens"] for c in calls} <= set(range(8, 13))
    assert len({c.body["max_tokens"] for c in calls}) > 1


def test_sampled_chat_requests_carry_a_seed_that_replays_with_the_run_seed() -> None:
    prompts, source = load_prompts(None)
    sampled = ChatWorkload(model="llm", prompts=prompts, source=source, temperature=0.8)
    first = [sampled.next_call(random.Random(7)).body for _ in range(3)]
    again = [sampled.next_call(random.Random(7)).body for _ in range(3)]
    assert first == again and all(0 <= body["seed"] < 2**31 for body in first)
    assert sampled.next_call(random.Random(8)).body["seed"] != first[0]["seed"]
    for temperature in (None, 0.0):
        greedy = ChatWorkload(model="llm", prompts=prompts, source=source, temperature=temperature)
        assert "seed" not in greedy.next_call(random.Random(7)).body


def test_embeddings_requests_carry_n_sentences_and_check_the_answer_count() -> None:
    prompts, source = load_prompts(None)
    workload = EmbeddingsWorkload(model="emb", prompts=prompts, source=source, sentences_per_request=5)
    call = workload.next_call(random.Random(0))
    assert len(call.body["input"]) == 5 and call.inputs == 5
    accounting = workload.account(call, {"data": [{}] * 5, "usage": {"prompt_tokens": 60}})
    assert accounting.inputs == 5 and accounting.prompt_tokens == 60
    with pytest.raises(ValueError, match="expected 5"):
        workload.account(call, {"data": [{}] * 4})


def test_infer_tensors_follow_the_declared_shapes_and_datatypes() -> None:
    metadata = {
        "max_batch_size": 32,
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "scale", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }
    workload = InferWorkload(model="enc", version=2, metadata=metadata, rows=4, sequence=6)
    call = workload.next_call(random.Random(0))
    assert call.path == "/v2/models/enc/versions/2/infer"
    tensors = {t["name"]: t for t in call.body["inputs"]}
    assert tensors["input_ids"]["shape"] == [4, 6] and len(tensors["input_ids"]["data"]) == 24
    assert set(tensors["attention_mask"]["data"]) == {1}
    assert tensors["scale"]["shape"] == [4, 3] and all(0 <= v < 1 for v in tensors["scale"]["data"])


def test_output_length_range_parsing() -> None:
    assert parse_range("64", "max-tokens") == (64, 64)
    assert parse_range("32:128", "max-tokens") == (32, 128)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(InvalidInput, match="max-tokens"):
            parse_range(bad, "max-tokens")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/", "http://10.1.2.3", "http://192.168.0.9:80", "http://[::1]:8000"])
def test_loopback_and_private_targets_are_allowed(url: str) -> None:
    assert check_target(url, allow_remote=False) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://8.8.8.8:8000", "http://[2001:4860:4860::8888]/", "http://[::ffff:8.8.8.8]/"])
def test_public_targets_are_refused_without_allow_remote(url: str) -> None:
    with pytest.raises(InvalidInput, match="--allow-remote"):
        check_target(url, allow_remote=False)
    assert check_target(url, allow_remote=True)


def test_a_target_must_be_an_http_url() -> None:
    with pytest.raises(InvalidInput, match="http"):
        check_target("ftp://127.0.0.1/", allow_remote=False)


def test_every_point_is_bounded_in_time_and_count() -> None:
    with pytest.raises(InvalidInput, match="duration"):
        check_bounds(duration_s=0, max_requests=10, warmup_requests=0)
    with pytest.raises(InvalidInput, match="max-requests"):
        check_bounds(duration_s=10, max_requests=MAX_REQUESTS_PER_POINT_CAP + 1, warmup_requests=0)
    with pytest.raises(InvalidInput, match="warmup"):
        check_bounds(duration_s=10, max_requests=10, warmup_requests=-1)


def test_a_sweep_is_either_concurrency_or_rate_and_never_negative() -> None:
    with pytest.raises(InvalidInput, match="not both"):
        check_sweep(concurrency=[1], rates=[1.0])
    with pytest.raises(InvalidInput, match="rate"):
        check_sweep(concurrency=[], rates=[-1.0])
    with pytest.raises(InvalidInput, match="concurrency"):
        check_sweep(concurrency=[0], rates=[])
    with pytest.raises(InvalidInput, match="at least one"):
        check_sweep(concurrency=[], rates=[])
