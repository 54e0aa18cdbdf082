"""Privacy where data flows: the request logging mode is applied to every request in the API
layer; `metadata` keeps no text in the database or the log files; `full` keeps text until its
retention passes and the purge clears it; `off` writes nothing; the server opens no outbound
connection while it serves."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import select

from appliance.config import load_settings
from appliance.repository.store import ModelRepository
from appliance.store.admin_models import RequestLogEntry
from appliance.store.db import Database
from appliance.store.migrate import upgrade
from appliance.store.request_log import RequestLog, RequestRecord
from tests.helpers.admin import create_admin, sign_in
from tests.helpers.server import create_key, free_port, running_server
from tests.helpers.tiny_models import publish_embedder

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60
#: A string that must never be stored or logged in metadata mode.
SECRET_PROMPT = "zebra-secret-4711 the cat sat on the mat"
SECRET_MARKER = b"zebra-secret-4711"


def _rows(state_dir: Path) -> list[RequestLogEntry]:
    database = Database(load_settings(state_dir=state_dir).db_url)
    try:
        with database.session() as session:
            return list(session.scalars(select(RequestLogEntry).order_by(RequestLogEntry.id)))
    finally:
        database.close()


def _embed(base_url: str, key: str, text: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/embeddings", json={"model": "tiny-embed", "input": text}, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


class ServedProcess:
    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, key: str, log_path: Path, state_dir: Path) -> None:
        self.proc, self.base_url, self.key, self.log_path, self.state_dir = proc, base_url, key, log_path, state_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    """`appliance serve` as a real process in metadata mode, logging at debug level to a file."""
    state_dir = tmp_path_factory.mktemp("privacy") / "state"
    state_dir.mkdir()
    publish_embedder(ModelRepository(state_dir / "models"))
    key = create_key(state_dir, "privacy", ["infer"])
    port = free_port()
    log_path = state_dir.parent / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "HF_", "TRANSFORMERS_"))}
    env.update(APPLIANCE_STATE_DIR=str(state_dir), APPLIANCE_LOG_LEVEL="debug")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base_url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.05)
        yield ServedProcess(proc, base_url, key, log_path, state_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_metadata_mode_keeps_no_prompt_text_in_the_database_or_the_log_files(served: ServedProcess) -> None:
    assert _embed(served.base_url, served.key, SECRET_PROMPT).status_code == 200
    # A failing request carries the text too: it must not leak through an error path either.
    chat = httpx.post(
        f"{served.base_url}/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"Authorization": f"Bearer {served.key}"}, timeout=30,
    )
    assert chat.status_code in (400, 404)
    deadline = time.monotonic() + 10
    while len(_rows(served.state_dir)) < 2:
        assert time.monotonic() < deadline, "requests were not logged"
        time.sleep(0.05)
    rows = _rows(served.state_dir)
    embed = next(row for row in rows if row.endpoint == "/v1/embeddings")
    assert embed.model == "tiny-embed" and embed.status == 200 and embed.prompt_tokens and embed.latency_ms > 0
    assert embed.key_id == served.key.split("_")[1]
    assert all(row.prompt_text is None and row.completion_text is None for row in rows)
    leaked = [path for path in [*served.state_dir.rglob("*"), served.log_path] if path.is_file() and SECRET_MARKER in path.read_bytes()]
    assert leaked == []
    assert "debug" in served.log_path.read_text().lower() or served.log_path.stat().st_size > 0


def test_the_server_opens_no_outbound_connection_while_serving(served: ServedProcess) -> None:
    for _ in range(3):
        assert _embed(served.base_url, served.key, "hello world").status_code == 200
    process = psutil.Process(served.proc.pid)
    connections = [c for p in [process, *process.children(recursive=True)] for c in p.net_connections(kind="inet")]
    assert any(c.status == psutil.CONN_LISTEN for c in connections)
    outbound = [
        c for c in connections
        if c.raddr and not ipaddress.ip_address(c.raddr.ip).is_loopback
    ]
    assert outbound == []


def test_full_mode_keeps_text_until_the_retention_purge_clears_it(state_dir: Path) -> None:
    publish_embedder(ModelRepository(state_dir / "models"))
    with running_server(state_dir, logging_mode="full", log_retention_days=2) as server:
        assert _embed(server.base_url, server.key, SECRET_PROMPT).status_code == 200
        request_log = server.app.state.admin.request_log
        assert request_log.flush()
        (row,) = _rows(state_dir)
        assert row.prompt_text == SECRET_PROMPT
        assert row.text_expires_at is not None and row.text_expires_at - row.at == timedelta(days=2)
        assert request_log.purge_expired(now=datetime.now(UTC) + timedelta(days=1)) == 0
        assert request_log.purge_expired(now=datetime.now(UTC) + timedelta(days=2, seconds=1)) == 1
        (row,) = _rows(state_dir)
        assert row.prompt_text is None and row.completion_text is None and row.prompt_tokens


def test_the_background_purge_clears_expired_text(state_dir: Path) -> None:
    database = Database(load_settings(state_dir=state_dir).db_url)
    upgrade(database)
    request_log = RequestLog(database, purge_interval_s=0.05)
    request_log.start()
    try:
        old = datetime.now(UTC) - timedelta(days=3)
        request_log.submit(RequestRecord(old, "/v1/completions", "m", None, 200, 0.1, 3, 4, "old prompt", "old answer"), retention_days=1)
        request_log.submit(RequestRecord(datetime.now(UTC), "/v1/completions", "m", None, 200, 0.1, 3, 4, "new prompt", "new answer"), retention_days=1)
        assert request_log.flush()
        deadline = time.monotonic() + 10
        while _rows(state_dir)[0].prompt_text is not None:
            assert time.monotonic() < deadline, "the background purge did not run"
            time.sleep(0.05)
        old_row, new_row = _rows(state_dir)
        assert (old_row.prompt_text, old_row.completion_text) == (None, None)
        assert (new_row.prompt_text, new_row.completion_text) == ("new prompt", "new answer")
    finally:
        request_log.close()
        database.close()


def test_off_mode_writes_nothing_and_purge_now_deletes_everything(state_dir: Path) -> None:
    publish_embedder(ModelRepository(state_dir / "models"))
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        assert _embed(server.base_url, server.key, "hello world").status_code == 200
        assert server.app.state.admin.request_log.flush()
        assert len(_rows(state_dir)) == 1
        csrf = sign_in(client, server.base_url)
        listed = client.get(server.url("/admin/privacy")).text.split('id="request-log"')[1]
        assert "/v1/embeddings" in listed and "tiny-embed" in listed and "hello world" not in listed
        assert client.post(server.url("/admin/privacy/purge"), data={"csrf_token": csrf}).status_code == 303
        assert _rows(state_dir) == []
        assert client.post(server.url("/admin/privacy/logging"), data={"csrf_token": csrf, "mode": "off"}).status_code == 303
        assert _embed(server.base_url, server.key, "hello world").status_code == 200
        assert server.app.state.admin.request_log.flush()
        assert _rows(state_dir) == []
        # The dashboard still counts it (numbers in memory only).
        assert server.app.state.admin.request_log.live.since(0).requests == 2
