"""Usage and cost per key on a real server with tiny real models (a Llama chat model, an
embedder, a cross-encoder reranker, a KServe V2 adder): the counts equal the sum of the `usage`
fields the clients received, in logging mode `metadata` and in `off`, and so do the per-key
counters on /metrics; errors count as errors, refused keys not at all; `appliance usage` prints
the same numbers as JSON and CSV; the admin Usage page shows the key's numbers, its chart and
cost in the real browser, and the privacy page says usage is counted in every mode; a key's
group set, changed and cleared on the admin Keys page is where its usage is summed from then on."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import Result
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from appliance.api.request_logging import RESPONSE_CAPTURE_MAX_BYTES, _ResponseReader
from appliance.benchmark.results import BENCH_DIR, BenchResult, PointResult, VariantResult, write_result
from appliance.cli import app as cli_app
from appliance.cli.bench_cmd import RUNS_DIR
from appliance.config import load_settings
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository.store import ModelRepository
from appliance.store.audit import AuditFilter
from appliance.store.keys import KeyStore
from appliance.store.usage_queries import UsageFilter, usage_totals
from appliance.store.usage_report import format_cost
from appliance.store.usage_tables import UNKNOWN_MODEL
from appliance.store.usage_writes import Counters
from tests.helpers.admin import ADMIN_NAME, ADMIN_PASSWORD, CHROMIUM, CHROMIUM_ARGS, STEP_TIMEOUT_MS, create_admin, sign_in
from tests.helpers.decoders import make_tiny_llama
from tests.helpers.encoders import build_tiny_classifier
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder

ROOT = Path(__file__).resolve().parents[1]
CHAT, EMBED, RERANK, ADDER = "tiny-llama", "tiny-embed", "tiny-rerank", "adder"
MESSAGES = [{"role": "user", "content": "hello there, how are you today?"}]
#: Embedder throughput the fake bench result claims (inputs per second at its best point).
EMBED_INPUTS_PER_S = 200.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("usage")
    state = root / "state"
    settings = load_settings(state_dir=state)
    run_export(ExportRequest(source=str(make_tiny_llama(root / "llama")), name=CHAT, task="text-generation", quant="fp32"), settings)
    cross_encoder = build_tiny_classifier(root / "cross-encoder", labels=("LABEL_0",), seed=3)
    run_export(ExportRequest(source=str(cross_encoder), name=RERANK, task="text-classification", quant="fp32"), settings)
    repository = ModelRepository(state / "models")
    publish_embedder(repository)
    publish_adder(repository)
    create_admin(state)
    with running_server(state, create_keys={"alice": ["infer"], "bob": ["infer"]}, generation={"kv_budget_bytes": 64 << 20}) as running:
        KeyStore(running.ctx.database).set_group("alice", "team-a")
        yield running


@dataclass
class Expected:
    """What the clients were told they used, added up per model."""

    per_model: dict[str, Counters] = field(default_factory=dict)

    def add(self, model: str, **counts: int) -> None:
        self.per_model.setdefault(model, Counters()).add(Counters(requests=1, **counts))

    def total(self) -> Counters:
        total = Counters()
        for counters in self.per_model.values():
            total.add(counters)
        return total


def _counted(server: RunningServer, key: str) -> dict[str, Counters]:
    server.app.state.admin.usage.flush()
    prefix = key.split("_")[1]
    where = UsageFilter(*_period())
    counted: dict[str, Counters] = {}
    for total in usage_totals(server.ctx.database, where):
        if total.key_id == prefix:
            counted.setdefault(total.model, Counters()).add(total.counters)
    return counted


def _period() -> tuple[datetime, datetime]:
    """The last day, up to a little after now (a period ends before its `until`)."""
    now = datetime.now(UTC)
    return now - timedelta(days=1), now + timedelta(minutes=5)


def _difference(after: dict[str, Counters], before: dict[str, Counters]) -> dict[str, Counters]:
    changed = {}
    for model, counters in after.items():
        delta = Counters(**{name: value - getattr(before.get(model, Counters()), name) for name, value in counters.as_dict().items()})
        if delta != Counters():
            changed[model] = delta
    return changed


def _traffic(server: RunningServer, key: str) -> Expected:
    """One of every inference route, plus two errors; returns the usage the answers reported."""
    expected = Expected()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=key, max_retries=0)
    chat = client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    expected.add(CHAT, prompt_tokens=chat.usage.prompt_tokens, completion_tokens=chat.usage.completion_tokens)  # type: ignore[union-attr]
    chunks = list(
        client.chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    streamed = chunks[-1].usage
    expected.add(CHAT, prompt_tokens=streamed.prompt_tokens, completion_tokens=streamed.completion_tokens)  # type: ignore[union-attr]
    completion = client.completions.create(model=CHAT, prompt="the cat sat", max_tokens=4, temperature=0)
    expected.add(CHAT, prompt_tokens=completion.usage.prompt_tokens, completion_tokens=completion.usage.completion_tokens)  # type: ignore[union-attr]
    embedded = client.embeddings.create(model=EMBED, input=["hello world", "the cat sat", "blue sky"])
    expected.add(EMBED, prompt_tokens=embedded.usage.prompt_tokens, embedding_inputs=3)
    auth = {"Authorization": f"Bearer {key}"}
    ranked = httpx.post(server.url("/v1/rerank"), headers=auth, timeout=30, json={"model": RERANK, "query": "bees", "documents": ["honey", "bees make honey", "a car", "the sky"]})
    assert ranked.status_code == 200, ranked.text
    expected.add(RERANK, prompt_tokens=ranked.json()["usage"]["prompt_tokens"], rerank_documents=4)
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    inferred = httpx.post(server.url(f"/v2/models/{ADDER}/infer"), headers=auth, timeout=30, json={"inputs": [tensor, {**tensor, "name": "INPUT1"}]})
    assert inferred.status_code == 200, inferred.text
    expected.add(ADDER)
    missing = httpx.post(server.url("/v1/embeddings"), headers=auth, timeout=30, json={"model": "no-such-model", "input": "x"})
    assert missing.status_code == 404
    expected.add(UNKNOWN_MODEL, errors_4xx=1)
    invalid = httpx.post(server.url("/v1/embeddings"), headers=auth, timeout=30, json={"model": EMBED, "input": []})
    assert invalid.status_code == 400
    expected.add(EMBED, errors_4xx=1)
    refused = httpx.post(server.url("/v1/embeddings"), headers={"Authorization": "Bearer apl_0123456789ab_" + "x" * 43}, json={"model": EMBED, "input": "x"})
    assert refused.status_code == 401  # no key was verified: counted nowhere
    return expected


@pytest.mark.parametrize("mode", ["metadata", "off"])
def test_usage_equals_the_sum_of_the_usage_fields_the_clients_received(server: RunningServer, mode: str) -> None:
    server.app.state.admin.privacy.set_logging(mode, 7, actor="test", address="127.0.0.1")
    request_log = server.app.state.admin.request_log
    assert request_log.flush()
    logged_before = request_log.counts()[0]
    alice, bob = server.keys["alice"], server.keys["bob"]
    before, bob_before = _counted(server, alice), _counted(server, bob)
    expected = _traffic(server, alice)
    assert _difference(_counted(server, alice), before) == expected.per_model
    assert _difference(_counted(server, bob), bob_before) == {}
    assert request_log.flush()
    if mode == "off":
        assert request_log.counts()[0] == logged_before  # off: no request row, yet every request counted


def test_counts_name_the_serving_version_and_the_keys_group(server: RunningServer) -> None:
    _traffic(server, server.keys["alice"])
    server.app.state.admin.usage.flush()
    alice = server.keys["alice"].split("_")[1]
    lines = {(t.model, t.version, t.key_group) for t in usage_totals(server.ctx.database, UsageFilter(*_period())) if t.key_id == alice}
    assert {(CHAT, "1", "team-a"), (EMBED, "1", "team-a"), (RERANK, "1", "team-a"), (ADDER, "1", "team-a"), (UNKNOWN_MODEL, "", "team-a")} <= lines


def _cli(server: RunningServer, *args: str) -> Result:
    return CliRunner().invoke(cli_app, ["usage", "--state-dir", str(server.settings.state_dir), *args], catch_exceptions=False)


def test_the_usage_command_prints_the_same_numbers_as_json_and_csv(server: RunningServer) -> None:
    _traffic(server, server.keys["alice"])
    _traffic(server, server.keys["bob"])
    server.app.state.admin.usage.flush()
    counted = _counted(server, server.keys["alice"])
    result = _cli(server, "--key", "alice", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {line["key"] for line in report["lines"]} == {"alice"}
    for model, counters in counted.items():
        lines = [line for line in report["lines"] if line["model"] == model]
        assert sum(line["requests"] for line in lines) == counters.requests
        assert sum(line["completion_tokens"] for line in lines) == counters.completion_tokens
    table = _cli(server, "--since", "1d", "--csv")
    rows = list(csv.DictReader(io.StringIO(table.output)))
    assert {row["key"] for row in rows} == {"alice", "bob"} and {row["group"] for row in rows} == {"team-a", ""}
    bob_chat = next(row for row in rows if row["key"] == "bob" and row["model"] == CHAT)
    assert int(bob_chat["requests"]) == 3 and bob_chat["cost"] == "" and "appliance bench" in bob_chat["cost_basis"]
    plain = _cli(server, "--group", "team-a")
    assert plain.exit_code == 0 and "alice" in plain.output and "bob" not in plain.output
    assert f"no cost for {CHAT}" in plain.output


def test_bad_usage_input_is_one_line_and_exit_code_2(server: RunningServer) -> None:
    real = subprocess.run(
        [sys.executable, "-m", "appliance", "usage", "--state-dir", str(server.settings.state_dir), "--since", "last tuesday"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert real.returncode == 2 and real.stdout == "" and "Traceback" not in real.stderr
    assert real.stderr.strip().splitlines() == [
        "error: since: 'last tuesday' is not a date (YYYY-MM-DD, YYYY-MM-DDTHH:MM, or a span back like 7d, 12h)"
    ]
    for args, message in (
        (["--key", "nobody"], "no key named 'nobody'"),
        (["--json", "--csv"], "choose one"),
        (["--since", "2026-12-02", "--until", "2026-12-01"], "is not before until"),
    ):
        result = _cli(server, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _bench_embedder(state_dir: Path) -> None:
    """A bench result for the embedder, as `appliance bench --model tiny-embed -w embeddings` writes it."""
    point = PointResult(mode="closed", level=1, stats={"inputs_per_s": EMBED_INPUTS_PER_S}, cost={})
    result = BenchResult(
        target="http://127.0.0.1", workload={"kind": "embeddings"}, cost_unit="inputs", settings={}, cost_model={},
        variants=[VariantResult(model=EMBED, points=[point])],
    )
    write_result(result, state_dir / BENCH_DIR / RUNS_DIR / "20261201T000000Z", state_dir)


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_usage_page_shows_the_keys_numbers_chart_and_cost_in_the_browser(server: RunningServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    _bench_embedder(server.settings.state_dir)
    _traffic(server, server.keys["alice"])
    counted = _counted(server, server.keys["alice"])
    requests = sum(counters.requests for counters in counted.values())
    cost = server.app.state.admin.privacy.cost
    embed_cost = counted[EMBED].embedding_inputs / (EMBED_INPUTS_PER_S * 3600) * cost.per_hour
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.goto(server.url("/admin/login"))
        page.fill("#name", ADMIN_NAME)
        page.fill("#password", ADMIN_PASSWORD)
        page.click("#sign-in")
        page.wait_for_selector("#dashboard")
        page.click("nav a:has-text('Privacy')")
        assert "counted in every logging mode, off included" in page.locator("#privacy-usage").inner_text()
        page.click("nav a:has-text('Usage')")
        page.select_option("#usage-period", "day")
        page.click("#usage-filter button[type=submit]")
        row = page.locator("#usage-by-key tr[data-name='alice']")
        assert row.locator("td").nth(1).inner_text() == str(requests)
        group = page.locator("#usage-by-group tr[data-name='team-a']")
        assert int(group.locator("td").nth(1).inner_text()) == requests
        embed_line = page.locator("#usage-lines tr[data-key='alice'][data-model='tiny-embed'][data-version='1'] td[data-role='cost']")
        assert embed_line.inner_text() == format_cost(embed_cost, cost.currency) and embed_cost > 0
        chat_line = page.locator("#usage-lines tr[data-key='alice'][data-model='tiny-llama'] td[data-role='cost']")
        assert chat_line.inner_text() == "—"
        assert "appliance bench --model tiny-llama" in page.locator("#usage-cost-notes").inner_text()
        page.wait_for_function("() => { const img = document.querySelector('#usage-chart'); return img.complete && img.naturalWidth > 0; }")
        with page.expect_download() as download:
            page.click("#usage-csv")
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert sum(int(r["requests"]) for r in rows if r["key"] == "alice") == requests
        chart = page.request.get(server.url("/admin/usage/chart.png?period=day&by=key"))
        assert chart.status == 200 and chart.headers["content-type"] == "image/png"
        described = json.loads(_png_description(chart.body()))
        browser.close()
    alice_series = next(series for series in described["series"] if series["name"] == "alice")
    assert alice_series["requests"] == requests


def _png_description(png: bytes) -> str:
    """The `Description` tEXt chunk matplotlib wrote into a PNG."""
    from PIL import Image

    return Image.open(io.BytesIO(png)).text["Description"]


def test_the_usage_of_a_response_too_big_to_parse_is_read_from_its_tail() -> None:
    reader = _ResponseReader(keep_text=False)
    reader.start([(b"content-type", b"application/json")])
    rows = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(["0.125"] * 384)) for i in range(2000))
    body = ('{"object":"list","data":[' + rows + '],"model":"m","usage":{"prompt_tokens":4321,"total_tokens":4321},"truncated":[]}').encode()
    assert len(body) > RESPONSE_CAPTURE_MAX_BYTES
    for start in range(0, len(body), 65536):
        reader.feed(body[start:start + 65536])
    reader.finish()
    assert reader.tokens() == (4321, None)


def test_a_key_created_on_the_admin_keys_page_gets_its_group(server: RunningServer) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        created = client.post(server.url("/admin/keys"), data={"csrf_token": csrf, "name": "carol", "scope_infer": "on", "group": "team-c"})
        assert created.status_code == 201
        assert _group_shown(created.text, "carol") == "team-c"
        refused = client.post(server.url("/admin/keys"), data={"csrf_token": csrf, "name": "dave", "group": "no spaces"})
        assert refused.status_code == 400 and "not a valid group name" in refused.text
    assert KeyStore(server.ctx.database).find("carol").group == "team-c"


def test_the_usage_page_refuses_a_period_or_dimension_it_does_not_know(server: RunningServer) -> None:
    with httpx.Client() as client:
        sign_in(client, server.base_url)
        page = client.get(server.url("/admin/usage?period=year"))
        assert page.status_code == 400 and "period: must be one of day, week, month" in page.text
        chart = client.get(server.url("/admin/usage/chart.png?by=colour"))
        assert chart.status_code == 400 and "by: must be one of key, group, model" in chart.text
        assert client.get(server.url("/admin/usage.csv?period=month&by=model")).status_code == 200


def _group_shown(page: str, key_name: str) -> str:
    """The group the admin Keys page shows for the key."""
    row = page.split(f'data-key="{key_name}"')[1].split("</tr>")[0]
    return row.split('data-role="group-name">')[1].split("<")[0]


def _requests_per_group(client: httpx.Client, server: RunningServer) -> dict[str, int]:
    """The Usage page's "Per group" table (the page writes pending counts before it reads)."""
    page = client.get(server.url("/admin/usage?period=day"))
    assert page.status_code == 200, page.text
    table = page.text.split('id="usage-by-group"')[1].split("</table>")[0]
    return {name: int(requests) for name, requests in re.findall(r'<tr data-name="([^"]*)"><td>[^<]*</td><td>(\d+)</td>', table)}


def _embed(server: RunningServer, key: str, times: int) -> None:
    for _ in range(times):
        answer = httpx.post(server.url("/v1/embeddings"), headers={"Authorization": f"Bearer {key}"}, timeout=30, json={"model": EMBED, "input": "x"})
        assert answer.status_code == 200, answer.text


def test_a_keys_group_is_changed_and_cleared_on_the_admin_keys_page_and_its_usage_follows(server: RunningServer) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        created = client.post(server.url("/admin/keys"), data={"csrf_token": csrf, "name": "erin", "scope_infer": "on", "group": "team-e"})
        assert created.status_code == 201 and _group_shown(created.text, "erin") == "team-e"
        key = created.text.split('id="new-key">')[1].split("<")[0]
        _embed(server, key, 2)
        ungrouped_before = _requests_per_group(client, server).get("(no group)", 0)

        moved = client.post(server.url("/admin/keys/erin/group"), data={"csrf_token": csrf, "group": "team-f"})
        assert moved.status_code == 303
        page = client.get(server.url(moved.headers["location"])).text
        assert _group_shown(page, "erin") == "team-f" and "Group saved" in page
        _embed(server, key, 3)
        assert _requests_per_group(client, server)["team-f"] == 3

        cleared = client.post(server.url("/admin/keys/erin/group"), data={"csrf_token": csrf, "group": ""})
        assert cleared.status_code == 303
        assert _group_shown(client.get(server.url("/admin/keys")).text, "erin") == "—"
        _embed(server, key, 1)

        refused = client.post(server.url("/admin/keys/erin/group"), data={"csrf_token": csrf, "group": "no spaces"})
        assert refused.status_code == 400
        assert "group: &#39;no spaces&#39; is not a valid group name" in refused.text
        unknown = client.post(server.url("/admin/keys/nobody/group"), data={"csrf_token": csrf, "group": "team-f"})
        assert unknown.status_code == 404 and "no key named" in unknown.text

        per_group = _requests_per_group(client, server)
    assert per_group["team-e"] == 2 and per_group["team-f"] == 3
    assert per_group["(no group)"] == ungrouped_before + 1
    assert KeyStore(server.ctx.database).find("erin").group is None
    changes = server.app.state.admin.audit.query(AuditFilter(action="key.update"))
    assert sorted(event.detail.split(", ")[1] for event in changes if event.target == "erin") == [
        "group team-e -> team-f", "group team-f -> (none)",
    ]


def test_a_keys_limits_and_priority_are_changed_on_the_admin_keys_page_and_enforced(server: RunningServer) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        created = client.post(server.url("/admin/keys"), data={"csrf_token": csrf, "name": "fay", "scope_infer": "on", "rpm": "50"})
        assert created.status_code == 201
        key = created.text.split('id="new-key">')[1].split("<")[0]
        changed = client.post(
            server.url("/admin/keys/fay/limits"),
            data={"csrf_token": csrf, "rpm": "2", "tpm": "", "tokens_per_day": "900", "tokens_per_month": "20000", "priority": "batch"},
        )
        assert changed.status_code == 303 and "Limits and priority saved" in client.get(server.url(changed.headers["location"])).text
        info = KeyStore(server.ctx.database).find("fay")
        assert info.limits.as_json() == {"rpm": 2, "tpm": None, "tokens_per_day": 900, "tokens_per_month": 20000}
        assert info.priority == "batch"
        _embed(server, key, 2)
        third = httpx.post(server.url("/v1/embeddings"), headers={"Authorization": f"Bearer {key}"}, timeout=30, json={"model": EMBED, "input": "x"})
        assert third.status_code == 429 and third.headers["x-ratelimit-limit-requests"] == "2"

        refused = client.post(server.url("/admin/keys/fay/limits"), data={"csrf_token": csrf, "rpm": "two", "priority": "batch"})
        assert refused.status_code == 400 and "rpm: &#39;two&#39; is not a whole number" in refused.text
        wrong = client.post(server.url("/admin/keys/fay/limits"), data={"csrf_token": csrf, "rpm": "2", "priority": "urgent"})
        assert wrong.status_code == 400 and "priority" in wrong.text
        assert KeyStore(server.ctx.database).find("fay").priority == "batch", "a refused change writes nothing"
        cleared = client.post(server.url("/admin/keys/fay/limits"), data={"csrf_token": csrf, "priority": "interactive"})
        assert cleared.status_code == 303
    assert KeyStore(server.ctx.database).find("fay").limits.any is False
    changes = [event.detail for event in server.app.state.admin.audit.query(AuditFilter(action="key.update")) if event.target == "fay"]
    assert any("priority interactive -> batch" in detail and "'rpm': 2" in detail for detail in changes)


def _key_counters(server: RunningServer) -> tuple[str, dict[tuple[str, ...], float]]:
    """/metrics as its text and the per-key samples: (name, key, model, class or kind) -> value."""
    text = httpx.get(server.url("/metrics"), timeout=30).text
    samples: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("appliance_key_requests_total", "appliance_key_tokens_total"):
                labels = sample.labels
                detail = labels["status_class"] if sample.name == "appliance_key_requests_total" else labels["kind"]
                samples[(sample.name, labels["key"], labels["model"], detail)] = sample.value
    return text, samples


def test_metrics_count_each_keys_requests_and_tokens_as_the_clients_were_told(server: RunningServer) -> None:
    alice, bob = server.keys["alice"], server.keys["bob"]
    _, before = _key_counters(server)
    expected = _traffic(server, alice)
    text, after = _key_counters(server)
    changed = {labels: value - before.get(labels, 0.0) for labels, value in after.items() if value != before.get(labels, 0.0)}
    alice_id = alice.split("_")[1]
    wanted: dict[tuple[str, ...], float] = {}
    for model, counters in expected.per_model.items():
        errors = counters.errors_4xx + counters.errors_5xx
        for labels, value in (
            (("appliance_key_requests_total", alice_id, model, "2xx"), counters.requests - errors),
            (("appliance_key_requests_total", alice_id, model, "4xx"), counters.errors_4xx),
            (("appliance_key_requests_total", alice_id, model, "5xx"), counters.errors_5xx),
            (("appliance_key_tokens_total", alice_id, model, "prompt"), counters.prompt_tokens),
            (("appliance_key_tokens_total", alice_id, model, "completion"), counters.completion_tokens),
        ):
            if value:
                wanted[labels] = float(value)
    assert changed == wanted
    assert wanted[("appliance_key_requests_total", alice_id, UNKNOWN_MODEL, "4xx")] == 1
    assert bob.split("_")[1] not in {labels[1] for labels in changed}
    assert alice.split("_", 2)[2] not in text and bob.split("_", 2)[2] not in text  # ids only, never a secret
