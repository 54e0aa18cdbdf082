"""The admin Batches page and the Privacy page's batch files on a real server with a tiny
embedder: a completed batch is listed with its key's name, progress and cost note, a failed
one with its validation errors; a running batch and one waiting behind it are cancelled from
the page (the cancel reaches the server's runner); delete removes the row and the files from
disk; files download as attachments; the Privacy page lists the files and "Delete all batch
files" removes them except the input of an unfinished batch; bad requests get a readable
message, never a 500; every action is audited; and the page in chromium."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.repository.store import ModelRepository
from appliance.store.audit import AuditFilter
from tests.helpers.admin import ADMIN_NAME, ADMIN_PASSWORD, CHROMIUM, CHROMIUM_ARGS, STEP_TIMEOUT_MS, create_admin, sign_in
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_embedder

EMBED = "tiny-embed"
FINAL = ("completed", "failed", "expired", "cancelled")
BATCH_TIMEOUT_S = 120.0
#: Lines of a batch meant to still run when the test acts on it (it is cancelled long before).
LONG_LINES = 4000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("admin-batches") / "state"
    publish_embedder(ModelRepository(state / "models"))
    create_admin(state)
    with running_server(state, create_keys={"alice": ["infer"]}) as running:
        yield running


@pytest.fixture
def admin(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with httpx.Client() as client:
        yield client, sign_in(client, server.base_url)


def _lines(count: int, prefix: str = "e") -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": EMBED, "input": f"text {i}"}}).encode()
        + b"\n"
        for i in range(count)
    )


def _upload(server: RunningServer, content: bytes, name: str = "texts.jsonl") -> str:
    answer = httpx.post(
        server.url("/v1/files"), headers=server.auth(), files={"file": (name, content)}, data={"purpose": "batch"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def _create(server: RunningServer, file_id: str) -> dict[str, Any]:
    answer = httpx.post(
        server.url("/v1/batches"), headers=server.auth(),
        json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _get(server: RunningServer, batch_id: str) -> dict[str, Any]:
    return httpx.get(server.url(f"/v1/batches/{batch_id}"), headers=server.auth()).json()


def _wait_final(server: RunningServer, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while (batch := _get(server, batch_id))["status"] not in FINAL:
        assert time.monotonic() < deadline, f"batch still {batch['status']}"
        time.sleep(0.05)
    return batch


def _completed_batch(server: RunningServer, lines: int = 3) -> dict[str, Any]:
    batch = _wait_final(server, _create(server, _upload(server, _lines(lines)))["id"])
    assert batch["status"] == "completed", batch
    return batch


def _wait_running(server: RunningServer, batch_id: str) -> None:
    """Until the runner has sent some of the batch's lines (it runs the oldest batch first)."""
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while (batch := _get(server, batch_id))["request_counts"]["completed"] == 0:
        assert batch["status"] == "in_progress" and time.monotonic() < deadline, batch
        time.sleep(0.02)


def _row(html: str, batch_id: str) -> str:
    match = re.search(rf'<tr data-batch="{batch_id}".*?</tr>', html, re.S)
    assert match, f"{batch_id} is not listed"
    return match.group(0)


def _events(server: RunningServer, action: str) -> list[Any]:
    return server.app.state.admin.audit.query(AuditFilter(action=action))


def test_the_batches_page_lists_a_completed_batch_with_its_key_progress_and_cost(server: RunningServer, admin) -> None:
    client, _csrf = admin
    batch = _completed_batch(server)
    page = client.get(server.url("/admin/batches"))
    assert page.status_code == 200 and 'href="/admin/batches"' in page.text
    row = _row(page.text, batch["id"])
    assert '<td data-role="key">alice</td>' in row and EMBED in row and "/v1/embeddings" in row
    assert '<progress value="3" max="3">' in row and "3 of 3 (100%)" in row
    assert '<td data-role="failed">0</td>' in row
    tokens = f'{batch["usage"]["input_tokens"]} / 0'
    assert f'<td data-role="tokens">{tokens}</td>' in row
    # No `appliance bench` figure for the embedder: the cost cell says why instead of a number.
    assert "not priced: no throughput measured for &#39;tiny-embed&#39;" in row
    assert f'/admin/batches/files/{batch["output_file_id"]}' in row and 'data-action="delete"' in row
    assert 'data-action="cancel"' not in row
    # Filters: by status and by key; an unknown status is a readable 400.
    alice = server.ctx.keys.find("alice").prefix
    assert batch["id"] in client.get(server.url(f"/admin/batches?status=completed&key={alice}")).text
    assert batch["id"] not in client.get(server.url("/admin/batches?status=failed")).text
    assert batch["id"] not in client.get(server.url("/admin/batches?key=(auth off)")).text
    bad = client.get(server.url("/admin/batches?status=sleeping"))
    assert bad.status_code == 400 and "status: must be one of" in bad.text


def test_a_batch_that_failed_validation_shows_its_errors_with_line_numbers(server: RunningServer, admin) -> None:
    client, _csrf = admin
    wrong_url = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": EMBED, "input": "a"}})
    batch = _create(server, _upload(server, _lines(1) + wrong_url.encode() + b"\n"))
    assert batch["status"] == "failed"
    row = _row(client.get(server.url("/admin/batches")).text, batch["id"])
    assert '<details data-role="errors" open>' in row and "line 2: <code>mismatched_url</code>" in row


def test_a_running_batch_and_one_waiting_behind_it_are_cancelled_from_the_page(
    server: RunningServer, admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, csrf = admin
    ctx = server.app.state.admin
    assert ctx.cancel_batch == server.app.state.batch_api.runner.cancel  # the app wires the runner in
    told: list[str] = []
    original = ctx.cancel_batch
    monkeypatch.setattr(ctx, "cancel_batch", lambda batch_id: (told.append(batch_id), original(batch_id)))
    running = _create(server, _upload(server, _lines(LONG_LINES, "long")))
    waiting = _create(server, _upload(server, _lines(LONG_LINES, "wait")))
    _wait_running(server, running["id"])
    page = client.get(server.url("/admin/batches")).text
    assert 'data-action="cancel"' in _row(page, running["id"]) and 'data-action="delete"' not in _row(page, running["id"])
    # An unfinished batch cannot be deleted: a readable 400 on the page, not a 500.
    refused = client.post(server.url(f"/admin/batches/{running['id']}/delete"), data={"csrf_token": csrf})
    assert refused.status_code == 400 and "cancel the batch first" in refused.text
    for batch in (waiting, running):
        answer = client.post(server.url(f"/admin/batches/{batch['id']}/cancel"), data={"csrf_token": csrf})
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/batches?done=batch-cancelled"
    assert told == [waiting["id"], running["id"]]
    stopped, skipped = _wait_final(server, running["id"]), _wait_final(server, waiting["id"])
    assert stopped["status"] == "cancelled" and stopped["request_counts"]["completed"] < LONG_LINES
    assert skipped["status"] == "cancelled" and skipped["request_counts"]["completed"] == 0
    assert {e.target for e in _events(server, "batch.cancel")} >= {running["id"], waiting["id"]}
    # A finished batch cannot be cancelled, an unknown one is not found: messages on the page.
    completed = _completed_batch(server)
    again = client.post(server.url(f"/admin/batches/{completed['id']}/cancel"), data={"csrf_token": csrf})
    assert again.status_code == 400 and "cannot cancel a batch whose status is &#39;completed&#39;" in again.text
    missing = client.post(server.url("/admin/batches/batch_nope/cancel"), data={"csrf_token": csrf})
    assert missing.status_code == 404 and "batch &#39;batch_nope&#39; not found" in missing.text


def test_delete_removes_the_batch_and_its_files_from_disk(server: RunningServer, admin) -> None:
    client, csrf = admin
    batch = _completed_batch(server)
    folder = server.settings.batch_files_dir
    paths = [folder / f"{batch[name]}.jsonl" for name in ("input_file_id", "output_file_id")]
    assert all(path.is_file() for path in paths)
    answer = client.post(server.url(f"/admin/batches/{batch['id']}/delete"), data={"csrf_token": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/admin/batches?done=batch-deleted"
    page = client.get(server.url(answer.headers["location"]))
    assert "Batch deleted with its input, output and error files" in page.text and f'data-batch="{batch["id"]}"' not in page.text
    assert not any(path.exists() for path in paths)
    assert httpx.get(server.url(f"/v1/batches/{batch['id']}"), headers=server.auth()).status_code == 404
    assert httpx.get(server.url(f"/v1/files/{batch['output_file_id']}"), headers=server.auth()).status_code == 404
    event = next(e for e in _events(server, "batch.delete") if e.target == batch["id"])
    assert event.actor == ADMIN_NAME and "key alice" in event.detail and "2 files" in event.detail
    gone = client.post(server.url(f"/admin/batches/{batch['id']}/delete"), data={"csrf_token": csrf})
    assert gone.status_code == 404 and "not found" in gone.text


def test_a_batch_file_downloads_as_an_attachment_for_a_signed_in_admin_only(server: RunningServer, admin) -> None:
    client, _csrf = admin
    batch = _completed_batch(server)
    path = f"/admin/batches/files/{batch['output_file_id']}"
    with httpx.Client() as stranger:
        assert stranger.get(server.url(path)).status_code == 303  # to the login page
    answer = client.get(server.url(path))
    assert answer.status_code == 200 and answer.headers["content-disposition"].startswith("attachment")
    expected = httpx.get(server.url(f"/v1/files/{batch['output_file_id']}/content"), headers=server.auth()).content
    assert answer.content == expected and len(answer.content.splitlines()) == 3
    assert any(e.target == batch["output_file_id"] for e in _events(server, "batch.download"))
    assert client.get(server.url("/admin/batches/files/file-nope")).status_code == 404


def test_the_privacy_page_lists_batch_files_and_deletes_all_but_the_input_of_an_unfinished_batch(server: RunningServer, admin) -> None:
    client, csrf = admin
    loose = _upload(server, _lines(2), name="loose.jsonl")
    done = _completed_batch(server)
    running = _create(server, _upload(server, _lines(LONG_LINES, "busy")))
    _wait_running(server, running["id"])
    try:
        page = client.get(server.url("/admin/privacy"))
        assert page.status_code == 200
        assert "Usage counts:" in page.text and "counted in every" in page.text
        assert "prompt and answer text" in page.text and "refused entirely" in page.text
        files = server.app.state.admin.files
        count, size = files.totals()
        assert f"Holding {count} files" in page.text
        for file_id in (loose, done["input_file_id"], done["output_file_id"], running["input_file_id"]):
            row = re.search(rf'<tr data-file="{file_id}">.*?</tr>', page.text, re.S)
            assert row, f"{file_id} is not listed"
            assert "<td>alice</td>" in row.group(0)
        assert "loose.jsonl" in page.text and "read by an unfinished batch" in page.text
        deleted = client.post(server.url("/admin/privacy/batch-files/delete"), data={"csrf_token": csrf})
        assert deleted.status_code == 200
        kept = files.get(running["input_file_id"], None)
        assert f"{count - 1} batch files deleted" in deleted.text and "1 kept: unfinished batches read them" in deleted.text
        assert [info.id for info in files.list(None)] == [kept.id]
        assert sorted(p.name for p in server.settings.batch_files_dir.glob("*.jsonl")) == [f"{kept.id}.jsonl"]
        event = _events(server, "privacy.purge")[-1]
        assert event.target == "batch_files" and f"{count - 1} batch files ({size - kept.bytes} bytes) deleted" in event.detail
    finally:
        httpx.post(server.url(f"/v1/batches/{running['id']}/cancel"), headers=server.auth())
        _wait_final(server, running["id"])


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_batches_page_shows_the_batch_in_the_browser(server: RunningServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    batch = _completed_batch(server)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(server.url("/admin/login"))
            page.fill("#name", ADMIN_NAME)
            page.fill("#password", ADMIN_PASSWORD)
            page.click("#sign-in")
            page.wait_for_selector("#dashboard")
            page.click("nav a:has-text('Batches')")
            row = page.locator(f"tr[data-batch='{batch['id']}']")
            assert row.locator("[data-role=status]").inner_text() == "completed"
            assert row.locator("[data-role=key]").inner_text() == "alice"
            assert row.locator("progress").get_attribute("value") == "3"
            assert errors == []
        finally:
            browser.close()


def test_with_the_batch_api_off_the_pages_say_so_and_refuse_a_cancel(tmp_path: Path) -> None:
    state = tmp_path / "state"
    create_admin(state)
    with running_server(state, create_keys={}, batch_api={"enabled": False}) as off, httpx.Client() as client:
        csrf = sign_in(client, off.base_url)
        page = client.get(off.url("/admin/batches"))
        assert page.status_code == 200 and "The Batch API is off on this server" in page.text
        refused = client.post(off.url("/admin/batches/batch_x/cancel"), data={"csrf_token": csrf})
        assert refused.status_code == 409 and "batch_api.enabled = false" in refused.text
        privacy = client.get(off.url("/admin/privacy"))
        assert privacy.status_code == 200 and "No batch files." in privacy.text and "The Batch API is off on this server" in privacy.text
