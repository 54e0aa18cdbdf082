"""Exports started from the Models page: `appliance export` runs as its own process, the page
follows its status and log, and the published version is served when it finishes; bad
requests name the field."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.admin import create_admin, sign_in
from tests.helpers.server import running_server

EXPORT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.encoders import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "model")


def test_an_export_started_in_the_ui_is_followed_and_then_served(state_dir: Path, tiny_encoder: Path) -> None:
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        started = client.post(
            server.url("/admin/exports"),
            data={"csrf_token": csrf, "source": str(tiny_encoder), "name": "ui-encoder", "quant": "int8", "task": ""},
        )
        assert started.status_code == 303
        job_id = int(started.headers["location"].split("job=")[1])
        busy = client.post(server.url("/admin/exports"), data={"csrf_token": csrf, "source": str(tiny_encoder), "name": "second", "quant": "int8"})
        assert busy.status_code == 400 and "already running" in busy.text
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        while True:
            status = client.get(server.url(f"/admin/api/exports/{job_id}")).json()
            if status["finished"]:
                break
            assert time.monotonic() < deadline, status["log"]
            time.sleep(0.5)
        assert status["status"] == "succeeded", status["log"]
        assert status["log"].strip()
        deadline = time.monotonic() + 60
        while server.state("ui-encoder") != "ready":
            assert time.monotonic() < deadline, "the exported model was not loaded"
            time.sleep(0.1)
        page = client.get(server.url(f"/admin/models?job={job_id}")).text
        assert 'id="model-ui-encoder"' in page and "int8" in page and f'data-job-url="/admin/api/exports/{job_id}"' in page
        actions = [e.action for e in server.app.state.admin.audit.query()]
        assert "export.start" in actions and "export.finish" in actions


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"source": "relative/path", "name": "m", "quant": "int8"}, "source:"),
        ({"source": "/no/such/folder", "name": "m", "quant": "int8"}, "source:"),
        ({"source": "package:bad name", "name": "m", "quant": "int8"}, "source:"),
        ({"source": "package:some-package", "name": "Bad Name", "quant": "int8"}, "name:"),
        ({"source": "package:some-package", "name": "m", "quant": "int3"}, "quant:"),
        ({"source": "package:some-package", "name": "m", "quant": "int8", "task": "painting"}, "task:"),
    ],
)
def test_bad_export_requests_are_refused_naming_the_field(form: dict[str, str], field: str) -> None:
    from appliance.admin.exports import check_export_request
    from appliance.errors import InvalidInput

    with pytest.raises(InvalidInput) as caught:
        check_export_request(form["source"], form["name"], form["quant"], form.get("task", ""))
    assert caught.value.message.startswith(field)
