"""The admin UI end to end in Debian's chromium, driven by Playwright (one browser, one page, in
order): first-admin setup with the token from the log, sign out and in, failed-login lockout,
create a key and use it (API and Playground), set, change and clear a key's group, set and
change a group's limits, undeploy
and deploy a model, pin it and set its
keep-alive, delete a whole model (refused while it serves), the export form's KV cache select
(int8 refused for fp16 weights), switch the privacy
mode and find it in the audit log, and a dashboard screenshot in test-artifacts/. Throughout,
the page must load nothing from outside the appliance and break no Content-Security-Policy."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.repository.store import ModelRepository
from appliance.store.key_groups import GroupStore
from appliance.store.rate_limits import RateLimits
from tests.helpers.admin import CHROMIUM, CHROMIUM_ARGS, STEP_TIMEOUT_MS, setup_token_from
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ADMIN = "root"
PASSWORD = "browser test passphrase"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None, reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Session:
    def __init__(self, server: RunningServer, page, log: _Lines) -> None:  # noqa: ANN001 - a Playwright Page
        self.server, self.page, self.log = server, page, log
        self.console_errors: list[str] = []
        self.foreign_requests: list[str] = []

    def go(self, path: str) -> None:
        self.page.goto(self.server.url(path))


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    state_dir = tmp_path_factory.mktemp("browser") / "state"
    state_dir.mkdir()
    repository = ModelRepository(state_dir / "models")
    publish_adder(repository)
    publish_embedder(repository)
    lines = _Lines()
    logging.getLogger("appliance.admin").addHandler(lines)
    try:
        with running_server(state_dir, create_keys={}) as server, sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.set_default_timeout(STEP_TIMEOUT_MS)
            page = context.new_page()
            session = Session(server, page, lines)
            page.on("dialog", lambda dialog: dialog.accept())
            page.on("console", lambda message: session.console_errors.append(message.text) if message.type == "error" else None)
            page.on(
                "request",
                lambda request: None if request.url.startswith(server.base_url) else session.foreign_requests.append(request.url),
            )
            yield session
            browser.close()
    finally:
        logging.getLogger("appliance.admin").removeHandler(lines)


def test_first_admin_is_created_with_the_setup_token_from_the_log(ui: Session) -> None:
    page = ui.page
    ui.go("/admin")
    assert page.url.endswith("/admin/setup")
    page.fill("#token", setup_token_from("\n".join(ui.log.lines)))
    page.fill("#name", ADMIN)
    page.fill("#password", PASSWORD)
    page.fill("#password_again", PASSWORD)
    page.click("#create-admin")
    page.wait_for_selector("text=Welcome: you are signed in.")
    assert page.url.endswith("/admin?done=welcome")


def test_signing_out_and_in_again(ui: Session) -> None:
    page = ui.page
    page.click("#logout")
    page.wait_for_selector("#login-form")
    page.fill("#name", ADMIN)
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    page.wait_for_selector("#dashboard")


def test_failed_logins_lock_the_name_out(ui: Session) -> None:
    page = ui.page
    page.click("#logout")
    messages = []
    for _ in range(6):
        page.fill("#name", "intruder")
        page.fill("#password", "guessing wrong")
        page.click("#sign-in")
        messages.append(page.inner_text("#error"))
    assert messages[0] == "Wrong name or password."
    assert "locked" in messages[4] and "locked" in messages[5]
    page.fill("#name", ADMIN)
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    page.wait_for_selector("#dashboard")


def test_a_key_created_in_the_ui_works_with_the_api_and_the_playground(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/keys")
    page.fill("#key-name", "browser-key")
    page.click("#create-key")
    key = page.inner_text("#new-key").strip()
    assert key.startswith("apl_")
    answer = httpx.post(
        ui.server.url("/v1/embeddings"), json={"model": "tiny-embed", "input": "hello world"},
        headers={"Authorization": f"Bearer {key}"}, timeout=30,
    )
    assert answer.status_code == 200
    ui.go("/admin/playground")
    page.fill("#pg-key", key)
    page.click("#pg-load")
    page.wait_for_selector("#pg-status:has-text('models ready')")
    page.select_option("#pg-model", "tiny-embed")
    page.select_option("#pg-kind", "embeddings")
    page.fill("#pg-input", "the cat sat on the mat")
    page.click("#pg-send")
    page.wait_for_selector("#pg-output:has-text('dimension 8')")
    ui.go("/admin/keys")
    assert page.inner_text("tr[data-key='browser-key'] [data-role=last-used]") != "—"


def test_a_keys_group_is_set_at_creation_then_changed_and_cleared(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/keys")
    page.fill("#key-name", "team-key")
    page.fill("#key-group", "team-a")
    page.click("#create-key")
    row = "tr[data-key='team-key']"
    assert page.inner_text(f"{row} [data-role=group-name]") == "team-a"
    page.fill(f"{row} input[name=group]", "team-b")
    page.click(f"{row} [data-action=set-group]")
    page.wait_for_selector("text=Group saved")
    assert page.inner_text(f"{row} [data-role=group-name]") == "team-b"
    # A name the store would refuse is caught by the field before it is sent (the server's
    # 400 naming the field is tested over HTTP).
    page.fill(f"{row} input[name=group]", "no spaces")
    page.click(f"{row} [data-action=set-group]")
    assert page.eval_on_selector(f"{row} input[name=group]", "input => input.validity.patternMismatch")
    page.fill(f"{row} input[name=group]", "")
    page.click(f"{row} [data-action=set-group]")
    page.wait_for_selector(f"{row} [data-role=group-name]:text-is('—')")
    assert ui.server.ctx.keys.find("team-key").group is None
    ui.go("/admin/audit")
    page.select_option("select[name=action]", "key.update")
    page.click("#audit-filter button[type=submit]:not([formaction])")
    assert "group team-b -> (none)" in page.inner_text("#audit tbody tr")


def test_a_groups_limits_are_set_before_it_has_keys_then_edited_in_its_row(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/keys")
    page.click("#groups > details > summary")
    page.fill("#group-name", "team-c")
    page.fill("#new-group-limits-form input[name=rpm]", "50")
    page.click("#new-group-limits-form [data-action=set-group-limits]")
    page.wait_for_selector("text=Group limits saved")
    row = "tr[data-group='team-c']"
    assert page.inner_text(f"{row} [data-role=limits-text]").strip() == "50 req/min"
    page.click(f"{row} summary")
    page.fill(f"{row} input[name=rpm]", "")
    page.fill(f"{row} input[name=tpm]", "2000")
    page.click(f"{row} [data-action=set-group-limits]")
    page.wait_for_selector(f"{row} [data-role=limits-text]:has-text('2000 tok/min')")
    assert GroupStore(ui.server.ctx.database).get("team-c").limits == RateLimits(tpm=2000)


def test_undeploy_and_deploy_a_model(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/models")
    page.click("#model-adder button[data-action=undeploy]")
    page.wait_for_selector("#model-adder [data-role=status]:has-text('unavailable')")
    assert ui.server.state("adder") == "unavailable"
    page.click("#model-adder button[data-action=deploy]")
    page.wait_for_selector("#model-adder [data-role=status]:has-text('ready')")
    assert ui.server.state("adder") == "ready"


def test_pin_keep_alive_and_whole_model_delete_from_the_models_page(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/models")
    assert "Memory budget:" in page.inner_text("#budget")
    assert "iB" in page.inner_text("#model-adder [data-role=memory]")
    page.click("#model-adder button[data-action=pin]")
    page.wait_for_selector("text=Pinned: this model is never evicted")
    assert "yes" in page.inner_text("#model-adder [data-role=pinned]") and ui.server.status("adder").pinned
    page.fill("#model-adder input[name=keep_alive]", "10m")
    page.click("#model-adder [data-role=keep-alive] button[type=submit]")
    page.wait_for_selector("text=Keep-alive saved.")
    assert "600 s" in page.inner_text("#model-adder [data-role=keep-alive]") and ui.server.status("adder").keep_alive_s == 600
    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#model-tiny-embed input[name=confirm_name]", "tiny-embed")
    page.click("#model-tiny-embed button[data-action=delete-model]")
    page.wait_for_selector("text=is serving; undeploy it first")
    assert ui.server.state("tiny-embed") == "ready", "a serving model is not deleted"
    ui.go("/admin/models")
    page.click("#model-tiny-embed button[data-action=undeploy]")
    page.wait_for_selector("#model-tiny-embed [data-role=status]:has-text('unavailable')")
    page.fill("#model-tiny-embed input[name=confirm_name]", "tiny-emb")
    page.click("#model-tiny-embed button[data-action=delete-model]")
    page.wait_for_selector("text=type the model's name")
    ui.go("/admin/models")
    page.fill("#model-tiny-embed input[name=confirm_name]", "tiny-embed")
    page.click("#model-tiny-embed button[data-action=delete-model]")
    page.wait_for_selector("text=Model deleted with all its versions.")
    assert page.query_selector("#model-tiny-embed") is None and ui.server.state("tiny-embed") is None
    ui.go("/admin/audit")
    assert "model.delete" in page.inner_text("#audit") and "model.pin" in page.inner_text("#audit")


def test_the_export_forms_kv_cache_select_refuses_int8_for_fp16_weights(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/models")
    assert page.eval_on_selector_all("#export-kv-cache option", "options => options.map(o => o.value)") == ["fp32", "int8"]
    assert page.input_value("#export-kv-cache") == "fp32", "fp32 is the default"
    assert "a quarter of the KV memory per token" in page.inner_text("#export-kv-cache-hint")
    page.fill("#export-source", "package:some-package")
    page.fill("#export-name", "llm")
    page.select_option("#export-form select[name=quant]", "fp16")
    page.select_option("#export-kv-cache", "int8")
    page.click("#export-form button[type=submit]")
    page.wait_for_selector("text=kv_cache: int8 applies to a decoder's int4 / int8 / int4-exact variants, not to fp16")
    assert ui.server.app.state.admin.export_jobs.recent() == [], "nothing was started"


def test_switching_the_privacy_mode_shows_in_the_audit_log(ui: Session) -> None:
    page = ui.page
    ui.go("/admin/privacy")
    page.check("#mode-full")
    page.click("#save-logging")
    page.wait_for_selector("text=Privacy settings saved.")
    assert "kept for 7 days" in page.inner_text("#privacy-summary")
    ui.go("/admin/audit")
    page.select_option("select[name=action]", "privacy.logging")
    page.click("#audit-filter button[type=submit]:not([formaction])")
    row = page.inner_text("#audit tbody tr")
    assert "privacy.logging" in row and ADMIN in row and "metadata -> full" in row and "127.0.0.1" in row


def test_dashboard_screenshot_and_a_page_that_stays_on_the_box(ui: Session) -> None:
    page = ui.page
    for _ in range(3):
        httpx.post(ui.server.url("/v2/models/adder/infer"), json={"inputs": []}, timeout=30)
    ui.server.app.state.admin.sampler.sample()
    ui.server.app.state.admin.sampler.sample()
    ui.go("/admin")
    page.wait_for_selector("#dashboard[data-refreshed]")
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "admin-dashboard.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    assert ui.foreign_requests == []
    assert [text for text in ui.console_errors if "Content Security Policy" in text] == []
