"""Found while testing the serving layer as a new user would; one regression test each:
a prompt too large for the context is refused before it is tokenised; the state directory is
private from the first command that creates it; a request refused for its deeply nested JSON
still gets its request-log row."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from appliance.app import create_app
from appliance.config import load_settings
from appliance.errors import ExportError
from appliance.export.pipeline import ExportRequest, run_export
from appliance.store.admin_models import RequestLogEntry
from appliance.store.db import Database
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[1]
HUGE_PROMPT_BYTES = 7_500_000


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("regressions")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    with running_server(state, generation={"kv_budget_bytes": 16 << 20, "speculative": "off"}) as running:
        yield running


def test_a_prompt_whose_size_alone_exceeds_the_context_is_refused_before_tokenising(server: RunningServer) -> None:
    huge = "word " * (HUGE_PROMPT_BYTES // 5)
    # A message may hold a million characters: the 7.5 MB come as eight messages.
    messages = [{"role": "user", "content": huge[: HUGE_PROMPT_BYTES // 8]}] * 8
    with httpx.Client(base_url=server.base_url, headers=server.auth(), timeout=60) as client:
        chat = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages})
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["param"] == "messages" and "cannot fit" in chat.json()["error"]["message"]
        completion = client.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": huge})
        assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"
        fits_bytes_not_tokens = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hello " * 400})
        assert fits_bytes_not_tokens.status_code == 400 and "context" in fits_bytes_not_tokens.json()["error"]["message"]
        assert client.get("/v2/health/live").status_code == 200


def test_a_deeply_nested_body_is_refused_and_still_logged(server: RunningServer) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    body = '{"model": "tiny-llama", "messages": ' + nested + "}"
    with httpx.Client(base_url=server.base_url, headers={**server.auth(), "Content-Type": "application/json"}, timeout=60) as client:
        refused = client.post("/v1/chat/completions", content=body)
        assert refused.status_code == 400
    assert server.app.state.admin.request_log.flush()
    database = Database(server.settings.db_url)
    try:
        with database.session() as session:
            rows = list(session.scalars(select(RequestLogEntry).where(RequestLogEntry.status == 400)))
    finally:
        database.close()
    assert any(row.endpoint == "/v1/chat/completions" for row in rows), "the refused request has its row"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_state_directory_is_private_from_whichever_command_creates_it(tmp_path: Path) -> None:
    by_export = tmp_path / "by-export"
    with pytest.raises(ExportError):
        run_export(ExportRequest(source=str(tmp_path / "missing.gguf"), name="x", task="text-generation"), load_settings(state_dir=by_export))
    assert _mode(by_export) == 0o700, "appliance up's first step (the export) creates it"
    by_server = tmp_path / "by-server"
    create_app(load_settings(state_dir=by_server))
    assert _mode(by_server) == 0o700
    by_keys = tmp_path / "by-keys"
    created = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "create", "app", "--quiet", "--state-dir", str(by_keys)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert created.returncode == 0, created.stderr
    assert _mode(by_keys) == 0o700
