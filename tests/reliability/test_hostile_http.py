"""Hostile HTTP input against the served default models: every one gets a 4xx in its API
family's error shape, nothing 5xx, no header is injected, and the server's memory stays
bounded while it refuses them.

Oversized bodies (declared and chunked), deeply nested JSON, huge `n` / `max_tokens`, invalid
UTF-8, CR/LF and control characters in model names (body and path), absurd V2 shapes and
lying binary-extension lengths.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import CHAT_MODEL, EMBEDDING_MODEL, TENSOR_MODEL, prepare_state
from tests.reliability.served import ServedAppliance, served

BODY_LIMIT_BYTES = 1 << 20
NESTING_DEPTH = 100_000
#: Refusing all of the below may not grow the server's resident memory by more than this.
RSS_GROWTH_MAX_BYTES = 256 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path) -> Iterator[ServedAppliance]:
    state = prepare_state(tmp_path_factory.mktemp("hostile") / "state", default_models_dir)
    with served(state.state_dir, state.key, APPLIANCE_MAX_BODY_BYTES=str(BODY_LIMIT_BYTES)) as appliance:
        yield appliance


def _post(server: ServedAppliance, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    merged = {"Content-Type": "application/json", **server.auth(), **(headers or {})}
    return httpx.post(server.url(path), content=content, headers=merged, timeout=60)


def _chat(**extra: object) -> dict[str, object]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def _assert_refused(response: httpx.Response, path: str, *statuses: int) -> None:
    allowed = statuses or (400,)
    assert response.status_code in allowed, (path, response.status_code, response.text[:300])
    body = response.json()
    if path.startswith("/v1"):
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    else:
        assert isinstance(body["error"], str), body


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", f"/v2/models/{TENSOR_MODEL}/infer"]


@pytest.mark.parametrize("path", ROUTES)
def test_body_over_the_limit_answers_413_declared_or_chunked(server: ServedAppliance, path: str) -> None:
    big = b'{"model": "' + b"a" * (BODY_LIMIT_BYTES + 10) + b'"}'
    _assert_refused(_post(server, path, big), path, 413)

    def chunks() -> Iterator[bytes]:
        for _ in range(BODY_LIMIT_BYTES // 65536 + 4):
            yield b" " * 65536

    chunked = httpx.post(server.url(path), content=chunks(), headers={"Content-Type": "application/json", **server.auth()}, timeout=60)
    assert chunked.status_code == 413, chunked.text[:200]


@pytest.mark.parametrize("path", ROUTES)
def test_deeply_nested_json_answers_400(server: ServedAppliance, path: str) -> None:
    nested = b'{"model": "x", "input": ' + b"[" * NESTING_DEPTH + b"]" * NESTING_DEPTH + b"}"
    _assert_refused(_post(server, path, nested), path)


@pytest.mark.parametrize("path", ROUTES)
def test_invalid_utf8_answers_400(server: ServedAppliance, path: str) -> None:
    _assert_refused(_post(server, path, b'{"model": "\xff\xfe\xfd", "input": "\xc3\x28"}'), path)


@pytest.mark.parametrize(
    "body, param",
    [
        (_chat(n=10**9), "n"),
        (_chat(max_tokens=10**12), "max_tokens"),
        (_chat(max_tokens=-1), "max_tokens"),
        (_chat(max_completion_tokens=10**9), "max_completion_tokens"),
        (_chat(top_logprobs=10**6, logprobs=True), "top_logprobs"),
        (_chat(stop=["x"] * 10_000), "stop"),
        (_chat(seed=2**80), "seed"),
        (_chat(temperature=float("1e308") * 10), "temperature"),
    ],
)
def test_absurd_generation_parameters_answer_400_naming_the_field(server: ServedAppliance, body: dict[str, object], param: str) -> None:
    content = json.dumps(body).replace("Infinity", "1e999").encode()
    response = _post(server, "/v1/chat/completions", content)
    _assert_refused(response, "/v1/chat/completions")
    assert (response.json()["error"]["param"] or "").startswith(param.split(".")[0]), response.json()


def test_huge_embedding_batches_answer_400(server: ServedAppliance) -> None:
    response = _post(server, "/v1/embeddings", json.dumps({"model": EMBEDDING_MODEL, "input": ["a"] * 100_000}).encode())
    _assert_refused(response, "/v1/embeddings", 400, 413)


@pytest.mark.parametrize(
    "shape, extra",
    [
        ([1 << 40, 4], {"data": [1.0] * 4}),
        ([-3, 4], {"data": [1.0] * 4}),
        ([1, 1 << 62], {"data": []}),
        ([2**31, 2**31, 2**31], {"data": [1.0]}),
    ],
)
def test_absurd_v2_shapes_answer_400_without_allocating(server: ServedAppliance, shape: list[int], extra: dict[str, object]) -> None:
    inputs = [{"name": name, "shape": shape, "datatype": "FP32", **extra} for name in ("INPUT0", "INPUT1")]
    path = f"/v2/models/{TENSOR_MODEL}/infer"
    _assert_refused(_post(server, path, json.dumps({"inputs": inputs}).encode()), path)


@pytest.mark.parametrize("header_length", ["99999999999", "-5", "abc", "3"])
def test_lying_binary_header_length_answers_400(server: ServedAppliance, header_length: str) -> None:
    path = f"/v2/models/{TENSOR_MODEL}/infer"
    response = _post(server, path, b'{"inputs": []}' + b"\x00" * 16, headers={"Inference-Header-Content-Length": header_length})
    _assert_refused(response, path)


@pytest.mark.parametrize(
    "name", ["adder\r\nX-Injected: yes", "adder\nSet-Cookie: a=b", "../../etc/passwd", "a" * 10_000, "\u202eredda", "adder\x00"]
)
def test_hostile_model_names_in_the_body_are_refused_and_inject_nothing(server: ServedAppliance, name: str) -> None:
    for path in ("/v1/embeddings", "/v1/chat/completions"):
        body = {"model": name, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
        response = _post(server, path, json.dumps(body).encode())
        _assert_refused(response, path, 400, 404)
        assert "x-injected" not in response.headers and "set-cookie" not in response.headers


@pytest.mark.parametrize("raw_name", ["adder%0d%0aX-Injected:%20yes", "adder%00", "%2e%2e%2f%2e%2e%2fetc", "a" * 4000])
def test_hostile_model_names_in_the_path_are_refused_and_inject_nothing(server: ServedAppliance, raw_name: str) -> None:
    """Sent over a raw socket, byte for byte, so no client library cleans the path first."""
    request = (
        f"POST /v2/models/{raw_name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status = int(head.split(" ", 2)[1])
    assert 400 <= status < 500, head
    assert "x-injected" not in head.lower()


def test_refusing_all_of_it_kept_the_server_up_and_its_memory_bounded(server: ServedAppliance) -> None:
    """Runs last in this module: repeat the heaviest refusals and compare memory."""
    before = server.rss_bytes()
    nested = b'{"model": "x", "input": ' + b"[" * NESTING_DEPTH + b"]" * NESTING_DEPTH + b"}"
    big_batch = json.dumps({"model": EMBEDDING_MODEL, "input": ["word " * 50] * 5000}).encode()
    for _ in range(10):
        _post(server, "/v1/embeddings", nested)
        _post(server, "/v1/embeddings", big_batch)
        _post(server, "/v1/chat/completions", json.dumps(_chat(n=10**9)).encode())
    after = server.rss_bytes()
    print(f"server RSS {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB")
    assert after - before < RSS_GROWTH_MAX_BYTES
    assert httpx.get(server.url("/v2/health/ready"), timeout=30).status_code == 200
    ok = httpx.post(server.url("/v1/embeddings"), json={"model": EMBEDDING_MODEL, "input": "still here"}, headers=server.auth(), timeout=60)
    assert ok.status_code == 200
    assert "Traceback" not in server.log_text()
