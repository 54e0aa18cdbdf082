"""Exports started from the Models page: `appliance export` runs as its own process, the page
follows its status and log, and the published version is served when it finishes; bad
requests name the field. The KV cache choice reaches the child as `--kv-cache`, is refused
where the export itself would refuse it, in its words, is kept on the job, and the version
table shows what the export decided."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from appliance.admin.exports import check_export_request
from appliance.errors import ExportError, InvalidInput
from appliance.repository.store import ModelRepository
from tests.helpers.admin import create_admin, sign_in
from tests.helpers.server import running_server
from tests.helpers.tiny_models import publish_adder

EXPORT_TIMEOUT_S = 300
#: Stands in for `python -m appliance`: prints the arguments the export would get, then exits 0.
ARGUMENT_ECHO = [sys.executable, "-c", "import sys; print(' '.join(sys.argv[1:]))"]
#: report.json `details.kv_cache` as text_generation.py writes it when int8 is kept.
INT8_KEPT = {
    "datatype": "INT8",
    "chosen_by": "--kv-cache int8 within +1% perplexity over the fp32 cache",
    "perplexity_fp32_cache": 12.3456,
    "perplexity_int8_cache": 12.3357,
    "perplexity_increase": -0.0008,
    "next_token_agreement": 0.94,
    "bytes_per_token_fp32": 18432,
    "bytes_per_token": 4608,
}


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
        ({"source": "package:some-package", "name": "m", "quant": "int4", "kv_cache": "int4"}, "kv_cache:"),
        ({"source": "package:some-package", "name": "m", "quant": "int4", "kv_cache": ""}, "kv_cache:"),
        ({"source": "package:some-package", "name": "m", "quant": "fp16", "kv_cache": "int8"}, "kv_cache:"),
        ({"source": "package:some-package", "name": "m", "quant": "auto", "task": "feature-extraction", "kv_cache": "int8"}, "kv_cache:"),
    ],
)
def test_bad_export_requests_are_refused_naming_the_field(form: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_export_request(form["source"], form["name"], form["quant"], form.get("task", ""), form.get("kv_cache", "fp32"))
    assert caught.value.message.startswith(field) and caught.value.field == field.rstrip(":")


@pytest.mark.parametrize(
    ("task", "quant"),
    [("text-generation", "fp16"), ("text-generation", "fp32"), ("feature-extraction", "int8"), ("text-classification", "fp32")],
)
def test_an_int8_kv_cache_is_refused_as_the_export_refuses_it(task: str, quant: str) -> None:
    """The form cannot import the export stage; both ask appliance.repository.kv_cache: run the
    export's own check on the same choice and compare the words."""
    from appliance.export.tasks.base import TaskExporter, get_task

    exporter = get_task(task)
    stand_in = SimpleNamespace(
        task=task, variants=exporter.variants, int8_kv_variants=exporter.int8_kv_variants,
        ctx=SimpleNamespace(kv_cache="int8", provider="cpu"), auto_variant=lambda provider: quant,
    )
    with pytest.raises(ExportError) as export_refusal:
        TaskExporter.resolve_variant(stand_in, quant)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as form_refusal:
        check_export_request("package:some-package", "m", quant, task, "int8")
    assert form_refusal.value.field == export_refusal.value.field == "kv_cache"
    assert form_refusal.value.message.removeprefix("kv_cache:") == export_refusal.value.message.removeprefix("kv-cache:")


@pytest.mark.parametrize(("task", "quant"), [("text-generation", "int4"), ("text-generation", "int8"), ("text-generation", "auto"), ("", "int4"), ("", "auto")])
def test_an_int8_kv_cache_is_accepted_for_weight_quantised_generation(task: str, quant: str) -> None:
    assert check_export_request("package:some-package", "m", quant, task, "int8").kv_cache == "int8"


def test_the_int8_capable_variants_are_the_ones_the_export_quantises() -> None:
    """The shared list must follow the export's weight-only recipes (a new recipe gets an int8
    cache in the CLI and in the form alike)."""
    from appliance.export.tasks.base import get_task
    from appliance.repository.kv_cache import INT8_KV_VARIANTS

    assert INT8_KV_VARIANTS == get_task("text-generation").int8_kv_variants


def _start(client: httpx.Client, url: str, csrf: str, source: Path, **fields: str) -> httpx.Response:
    return client.post(url, data={"csrf_token": csrf, "source": str(source), "name": "llm", "task": "text-generation", **fields})


def _finished(client: httpx.Client, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not (status := client.get(url).json())["finished"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def test_an_int8_kv_cache_chosen_in_the_form_reaches_the_export_and_the_job_list(state_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "hf-folder"
    source.mkdir()
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        server.app.state.admin.exports.command = ARGUMENT_ECHO
        csrf = sign_in(client, server.base_url)
        bad = _start(client, server.url("/admin/exports"), csrf, source, quant="int4", kv_cache="int2")
        assert bad.status_code == 400 and "is not one of fp32, int8" in bad.text and "kv_cache:" in bad.text
        refused = _start(client, server.url("/admin/exports"), csrf, source, quant="fp16", kv_cache="int8")
        assert refused.status_code == 400 and "kv_cache: int8 applies to a decoder&#39;s int4 / int8 / int4-exact variants" in refused.text
        assert server.app.state.admin.export_jobs.recent() == [], "a refused request starts no job"
        started = _start(client, server.url("/admin/exports"), csrf, source, quant="int4", kv_cache="int8")
        assert started.status_code == 303
        job_id = int(started.headers["location"].split("job=")[1])
        status = _finished(client, server.url(f"/admin/api/exports/{job_id}"))
        assert "--quant int4 --state-dir" in status["log"] and "--task text-generation --kv-cache int8 --" in status["log"]
        assert status["kv_cache"] == "int8"
        default = _start(client, server.url("/admin/exports"), csrf, source, quant="int4")
        default_id = int(default.headers["location"].split("job=")[1])
        assert "--kv-cache" not in _finished(client, server.url(f"/admin/api/exports/{default_id}"))["log"], "fp32 is the export's default"
        page = client.get(server.url("/admin/models")).text
        assert f'<tr data-job="{job_id}">' in page and '<td data-role="kv-cache">int8</td>' in page
        assert 'name="kv_cache"' in page and "<option>int8</option>" in page
        starts = [e.detail for e in server.app.state.admin.audit.query() if e.action == "export.start"]
        assert f"job {job_id}: {source} as int4, KV cache int8" in starts


def test_the_version_table_shows_the_kv_cache_the_export_kept(state_dir: Path) -> None:
    repository = ModelRepository(state_dir / "models")
    published = publish_adder(repository, "llm")
    report = json.loads((published.path / "report.json").read_text())
    (published.path / "report.json").write_text(json.dumps({**report, "details": {"kv_cache": INT8_KEPT}}))
    publish_adder(repository, "plain")
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        sign_in(client, server.base_url)
        page = client.get(server.url("/admin/models")).text
    llm, plain = page.split('id="model-llm"')[1].split("</section>")[0], page.split('id="model-plain"')[1].split("</section>")[0]
    assert '<td class="kv-cache" data-role="kv-cache">' in llm and ">INT8</span>" in llm
    assert "perplexity 12.35 over the fp32 cache, 12.34 over int8 (-0.08%)" in llm
    assert "4,608 bytes per token (fp32 cache: 18,432)" in llm
    assert "KV cache" not in plain, "a model without a KV cache gets no such column"


def test_a_report_without_a_kv_cache_or_with_odd_figures_is_shown_safely() -> None:
    from appliance.admin.pages.models import KvCacheOutcome
    from appliance.repository.manifest import Report

    def report(**details: object) -> Report:
        return Report(variant="int4", size_bytes=1, load_s=0.0, verdict="accepted", details=details)

    assert KvCacheOutcome.from_report(None) is None
    assert KvCacheOutcome.from_report(Report(variant="fp32", size_bytes=1, load_s=0.0, verdict="accepted")) is None
    assert KvCacheOutcome.from_report(report(kv_cache="INT8")) is None
    default = KvCacheOutcome.from_report(report(kv_cache={"datatype": "FP32", "chosen_by": "--kv-cache fp32 (the default)"}))
    assert default == KvCacheOutcome(datatype="FP32", chosen_by="--kv-cache fp32 (the default)", facts=())
    odd = KvCacheOutcome.from_report(report(kv_cache={"datatype": "FP32", "perplexity_fp32_cache": "12", "bytes_per_token": True}))
    assert odd is not None and odd.facts == ()
