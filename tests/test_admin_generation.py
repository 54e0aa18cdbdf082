"""Text-generation models on the admin pages: they are listed with their engine's provider, and
undeploy / deploy stop and restart their generation engine (and the decision survives a
restart of the server)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.admin import CHROMIUM, CHROMIUM_ARGS, create_admin, open_playground, sign_in
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def state(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("admin-generation")
    shutil.copytree(tiny_decoders.state_dir / "models", root / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    create_admin(root)
    return root


@pytest.fixture(scope="module")
def server(state) -> Iterator[RunningServer]:  # noqa: ANN001
    with running_server(state, generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


def _listed(server: RunningServer) -> list[str]:
    return [m["id"] for m in httpx.get(server.url("/v1/models"), headers=server.auth()).json()["data"]]


def test_generation_models_show_on_the_dashboard_and_models_page(server: RunningServer) -> None:
    with httpx.Client() as client:
        sign_in(client, server.base_url)
        models = client.get(server.url("/admin/api/metrics")).json()["models"]
        row = next(m for m in models if m["name"] == MODEL)
        assert (row["status"], row["provider"], row["task"]) == ("ready", "cpu", "text-generation")
        page = client.get(server.url("/admin/models")).text
        assert f'id="model-{MODEL}"' in page and "text-generation" in page


def test_undeploy_and_deploy_a_generation_model(server: RunningServer, state) -> None:  # noqa: ANN001
    with httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        assert client.post(server.url(f"/admin/models/{MODEL}/undeploy"), data={"csrf_token": csrf}).status_code == 303
        assert MODEL not in _listed(server)
        chat = httpx.post(
            server.url("/v1/chat/completions"), headers=server.auth(),
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert chat.status_code in (400, 404, 503)
        assert server.state(MODEL) == "unavailable"
        assert client.post(server.url(f"/admin/models/{MODEL}/deploy"), data={"csrf_token": csrf}).status_code == 303
        assert MODEL in _listed(server)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_playground_streams_a_chat_answer_in_the_browser(server: RunningServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = open_playground(browser, server.base_url, server.key or "", MODEL, "chat")
            page.fill("#pg-max-tokens", "6")
            # A random model may sample only tokens that print nothing (specials, whitespace):
            # about 1 request in 100 did. Seed 0 is known to print text for this prompt.
            page.fill("#pg-temperature", "1")
            page.fill("#pg-seed", "0")
            page.fill("#pg-input", "hello there")
            page.click("#pg-send")
            page.wait_for_selector("#pg-status:has-text('chunks')")
            assert page.inner_text("#pg-output").strip()
            status = page.inner_text("#pg-status")
            assert int(status.split()[0]) >= 1 and status.endswith("finish: length")
        finally:
            browser.close()
