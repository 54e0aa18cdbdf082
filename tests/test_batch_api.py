"""OpenAI's Files and Batch API on a real server with tiny real models (a Llama chat model and
an embedder), driven by the official `openai` client: 200-line chat and embeddings batches
complete with one result per line (custom ids kept, route errors in the error file, usage
totals equal to what the usage accounting counted); batches whose lines cannot run fail at
creation with line numbers; cancel; files are private to their key; bad uploads are refused
naming the problem; privacy mode `off` refuses the Batch API with 403."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.config import load_settings
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository.store import ModelRepository
from appliance.store.usage_queries import UsageFilter, usage_totals
from appliance.store.usage_writes import Counters
from tests.helpers.decoders import make_tiny_llama
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_embedder

CHAT, EMBED = "tiny-llama", "tiny-embed"
LINES = 200
#: Longest a test waits for a batch to end (200 tiny lines take a few seconds).
BATCH_TIMEOUT_S = 180.0
FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("batch")
    state = root / "state"
    settings = load_settings(state_dir=state)
    run_export(ExportRequest(source=str(make_tiny_llama(root / "llama")), name=CHAT, task="text-generation", quant="fp32"), settings)
    publish_embedder(ModelRepository(state / "models"))
    keys = {"alice": ["infer"], "bob": ["infer"]}
    with running_server(state, create_keys=keys, generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


def client(server: RunningServer, name: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=server.keys[name], max_retries=0, timeout=60)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(index: int, **body: Any) -> dict[str, Any]:
    request = {"model": CHAT, "messages": [{"role": "user", "content": f"question {index}"}], "max_tokens": 4, "temperature": 0}
    request.update(body)
    return {"custom_id": f"req-{index}", "method": "POST", "url": "/v1/chat/completions", "body": request}


def wait_final(api: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while True:
        batch = api.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def read_lines(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines()]


def test_a_200_line_chat_batch_completes_with_one_result_per_line(server: RunningServer) -> None:
    api = client(server)
    bad = {7, 99}  # an out-of-range temperature: the route refuses these lines with 400
    lines = [chat_line(i, temperature=9.0) if i in bad else chat_line(i) for i in range(LINES)]
    upload = api.files.create(file=("questions.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(jsonl(lines)) and upload.filename == "questions.jsonl"
    created = api.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"team": "triage"}
    )
    assert created.status == "in_progress" and created.request_counts.total == LINES and created.metadata == {"team": "triage"}
    batch = wait_final(api, created.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.completed == LINES - len(bad) and batch.request_counts.failed == len(bad)
    output = read_lines(api, batch.output_file_id)
    errors = read_lines(api, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(LINES) if i not in bad)
    assert sorted(line["custom_id"] for line in errors) == sorted(f"req-{i}" for i in bad)
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["object"] == "chat.completion" and line["id"].startswith("batch_req_")
    for line in errors:
        assert line["response"]["status_code"] == 400
        assert "temperature" in line["response"]["body"]["error"]["message"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    assert batch.usage is not None and (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
    # Usage accounting counted every line for alice, exactly what the lines' `usage` said.
    server.app.state.admin.usage.flush()
    alice = server.ctx.keys.find("alice").prefix
    now = datetime.now(UTC)
    rows = usage_totals(server.ctx.database, UsageFilter(since=now - timedelta(hours=1), until=now + timedelta(hours=1), key_id=alice, model=CHAT))
    counted = Counters()
    for row in rows:
        counted.add(row.counters)
    assert (counted.requests, counted.errors_4xx) == (LINES, len(bad))
    assert (counted.prompt_tokens, counted.completion_tokens) == (prompt, completion)
    # The output file is alice's, listed as a batch_output file, and the batch is in her list.
    assert api.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert created.id in [listed.id for listed in api.batches.list(limit=100).data]


def test_a_200_line_embeddings_batch_completes(server: RunningServer) -> None:
    api = client(server)
    lines = [
        {"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": EMBED, "input": [f"text {i}", "more"]}}
        for i in range(LINES)
    ]
    upload = api.files.create(file=("texts.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = wait_final(api, api.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == LINES and batch.error_file_id is None
    output = read_lines(api, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"emb-{i}" for i in range(LINES))
    assert all(len(line["response"]["body"]["data"]) == 2 for line in output)
    assert server.app.state.batch_api.batches.get(batch.id, None).inputs == 2 * LINES, "inputs counted for pricing"
    assert batch.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)


def test_a_batch_whose_lines_cannot_run_fails_at_creation_naming_the_lines(server: RunningServer) -> None:
    api = client(server)
    lines = [chat_line(0), chat_line(0), chat_line(2, stream=True), {**chat_line(3), "url": "/v1/embeddings"}, chat_line(4, model=EMBED)]
    upload = api.files.create(file=("bad.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    problems = {(error.line, error.code) for error in batch.errors.data}
    assert problems == {(2, "duplicate_custom_id"), (3, "invalid_stream"), (4, "mismatched_url"), (5, "mismatched_model")}


def test_cancel_stops_a_running_batch_and_keeps_what_was_done(server: RunningServer) -> None:
    api = client(server)
    lines = [chat_line(i, max_tokens=48, ignore_eos=True) for i in range(LINES)]
    upload = api.files.create(file=("long.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    created = api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = api.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_final(api, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    done = batch.request_counts.completed + batch.request_counts.failed
    assert done < LINES
    assert len(read_lines(api, batch.output_file_id)) == batch.request_counts.completed
    with pytest.raises(openai.BadRequestError, match="cannot cancel"):
        api.batches.cancel(next(b.id for b in api.batches.list(limit=100).data if b.status == "completed"))


def test_files_and_batches_are_private_to_their_key(server: RunningServer) -> None:
    alice, bob = client(server, "alice"), client(server, "bob")
    upload = alice.files.create(file=("mine.jsonl", io.BytesIO(jsonl([chat_line(0)]))), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(upload.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert upload.id not in [f.id for f in bob.files.list().data]
    assert upload.id in [f.id for f in alice.files.list().data]
    assert alice.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(upload.id)


@pytest.mark.parametrize(
    ("content", "purpose", "field", "words"),
    [
        (b'{"custom_id": "a"}\nnot json\n', "batch", "file", "line 2 is not valid JSON"),
        (b"[1, 2]\n", "batch", "file", "line 1 is not a JSON object"),
        (b"\n\n", "batch", "file", "no request lines"),
        (b'{"custom_id": "a"}\n', "fine-tune", "purpose", "must be one of batch"),
        (b'\xff\xfe{"a": 1}\n', "batch", "file", "not UTF-8"),
    ],
)
def test_bad_uploads_are_refused_naming_the_problem(server: RunningServer, content: bytes, purpose: str, field: str, words: str) -> None:
    files_before = len(list((server.settings.batch_files_dir).glob("*.jsonl")))
    response = httpx.post(
        server.url("/v1/files"), headers=server.auth(server.keys["alice"]), files={"file": ("x.jsonl", content)}, data={"purpose": purpose}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"]
    assert len(list(server.settings.batch_files_dir.glob("*.jsonl"))) == files_before, "nothing kept"
    assert not any((server.settings.batch_files_dir / ".incoming").iterdir())


def test_an_upload_without_multipart_or_a_part_is_a_400(server: RunningServer) -> None:
    headers = server.auth(server.keys["alice"])
    plain = httpx.post(server.url("/v1/files"), headers=headers, json={"purpose": "batch"})
    assert plain.status_code == 400 and "multipart/form-data" in plain.json()["error"]["message"]
    no_file = httpx.post(server.url("/v1/files"), headers=headers, files={"purpose": (None, "batch")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    no_purpose = httpx.post(server.url("/v1/files"), headers=headers, files={"file": ("x.jsonl", b"{}\n")})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"


def test_batch_requests_name_their_bad_fields(server: RunningServer) -> None:
    headers = server.auth(server.keys["alice"])
    cases = [
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, 404, "file_id"),
        ({"input_file_id": "x", "endpoint": "/v1/audio"}, 400, "endpoint"),
        ({"input_file_id": "x", "endpoint": "/v1/embeddings", "completion_window": "forever"}, 400, "completion_window"),
        ({"input_file_id": "x", "endpoint": "/v1/embeddings", "completion_window": "9999h"}, 400, "completion_window"),
    ]
    for body, status, param in cases:
        response = httpx.post(server.url("/v1/batches"), headers=headers, json=body)
        assert response.status_code == status, (body, response.text)
        assert param in (response.json()["error"]["param"] or ""), response.text
    assert httpx.get(server.url("/v1/batches/batch_nope"), headers=headers).status_code == 404


def test_privacy_mode_off_refuses_the_batch_api(server: RunningServer) -> None:
    privacy = server.app.state.batch_api.privacy
    saved = privacy.mode
    privacy.mode = "off"
    try:
        api = client(server)
        with pytest.raises(openai.PermissionDeniedError, match="privacy mode is 'off'"):
            api.files.create(file=("x.jsonl", io.BytesIO(jsonl([chat_line(0)]))), purpose="batch")
        response = httpx.post(
            server.url("/v1/batches"), headers=server.auth(server.keys["alice"]),
            json={"input_file_id": "file-x", "endpoint": "/v1/embeddings"},
        )
        assert response.status_code == 403 and "privacy" in response.json()["error"]["message"]
    finally:
        privacy.mode = saved


def test_an_upload_over_the_file_limit_is_a_413(tmp_path: Path) -> None:
    with running_server(tmp_path / "state", create_keys={"a": ["infer"]}, batch_api={"max_file_bytes": 2048}) as small:
        response = httpx.post(
            small.url("/v1/files"), headers=small.auth(), files={"file": ("x.jsonl", b"{}\n" * 2000)}, data={"purpose": "batch"}
        )
        assert response.status_code == 413
        assert not list(small.settings.batch_files_dir.glob("*.jsonl"))


def _slow_batch(api: openai.OpenAI, name: str) -> str:
    lines = [chat_line(i, max_tokens=48, ignore_eos=True) for i in range(LINES)]
    upload = api.files.create(file=(f"{name}.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id


def _wait_for_progress(api: openai.OpenAI, batch_id: str) -> None:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while api.batches.retrieve(batch_id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_batch_past_its_window_expires_with_its_unrun_lines_in_the_error_file(server: RunningServer) -> None:
    from sqlalchemy import update

    from appliance.store.batch_tables import Batch

    api = client(server)
    busy = _slow_batch(api, "keeps-the-runner-busy")  # one batch at a time: the next one waits
    _wait_for_progress(api, busy)
    waiting = _slow_batch(api, "expiring")
    with server.ctx.database.session() as session:  # its window ends before it gets its turn
        session.execute(update(Batch).where(Batch.id == waiting).values(expires_at=datetime.now(UTC)))
    api.batches.cancel(busy)
    batch = wait_final(api, waiting)
    assert batch.status == "expired" and batch.expired_at is not None and batch.output_file_id is None
    errors = read_lines(api, batch.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == sorted(f"req-{i}" for i in range(LINES)), "every unrun line"
    assert all(line["error"]["code"] == "batch_expired" and line["response"] is None for line in errors)


def test_a_running_batch_fails_and_its_answers_are_deleted_when_the_privacy_mode_becomes_off(server: RunningServer) -> None:
    api = client(server)
    batch_id = _slow_batch(api, "private")
    _wait_for_progress(api, batch_id)
    privacy = server.app.state.batch_api.privacy
    saved = privacy.mode
    privacy.mode = "off"
    try:
        batch = wait_final(api, batch_id)
    finally:
        privacy.mode = saved
    assert batch.status == "failed" and batch.errors.data[0].code == "privacy_mode_off"
    assert batch.output_file_id is None and batch.error_file_id is None
    assert not (server.settings.batch_work_dir / batch_id).exists(), "partial answers deleted"


def test_lists_page_with_after_and_has_more(server: RunningServer) -> None:
    api = client(server, "bob")
    uploads = [api.files.create(file=(f"p{i}.jsonl", io.BytesIO(jsonl([chat_line(i)]))), purpose="batch").id for i in range(3)]
    first = api.files.list(limit=2, order="asc")
    assert [f.id for f in first.data] == uploads[:2] and first.has_more
    rest = api.files.list(limit=2, order="asc", after=first.data[-1].id)
    assert [f.id for f in rest.data] == uploads[2:] and not rest.has_more
    newest = httpx.get(server.url("/v1/files?limit=1"), headers=server.auth(server.keys["bob"])).json()
    assert newest["data"][0]["id"] == uploads[-1] and newest["has_more"] and newest["last_id"] == uploads[-1]
    foreign = httpx.get(server.url("/v1/batches?after=batch_nope"), headers=server.auth(server.keys["bob"]))
    assert foreign.status_code == 400 and foreign.json()["error"]["param"] == "after"
