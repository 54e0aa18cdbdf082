"""Reranking with a cross-encoder (`/v1/rerank`, `/v2/rerank`, `/rerank`) on a real server: a
tiny random BertForSequenceClassification with one label, exported through the real export
stage (judged by ranking agreement with PyTorch), scores and orders documents exactly as
PyTorch does; `top_n`, `return_documents`, long documents cut and counted, a thousand
documents in a few batches, and the 400s that name the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from appliance.benchmark.runner import BenchOptions, run_bench
from appliance.config import CostSettings, load_settings
from appliance.export.pipeline import ExportRequest, run_export
from appliance.export.tasks.text_classification import scoring_spec, spearman
from appliance.kernels.scoring import relevance_scores
from appliance.repository.store import ModelRepository
from tests.helpers.admin import CHROMIUM, CHROMIUM_ARGS, create_admin, open_playground
from tests.helpers.encoders import build_tiny_classifier
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder

MODEL = "tiny-rerank"
QUERY = "how do bees make honey"
DOCUMENTS = [
    "bees collect nectar and make honey in the hive",
    "the train to the city leaves every hour",
    "honey is made from nectar",
    "a cat sat on the mat",
    "water is blue when the sky is blue",
    "bees make honey from the nectar of many flowers in summer",
]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("cross-encoder") / "model", labels=("LABEL_0",), seed=3)


@pytest.fixture(scope="module")
def server(cross_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("rerank-state")
    result = run_export(ExportRequest(source=str(cross_encoder), name=MODEL, task="text-classification", quant="fp32"), load_settings(state_dir=state))
    report = json.loads((result.version.path / "report.json").read_text())
    assert report["verdict"] == "accepted" and report["quality"]["spearman_mean"] > 0.999, report["quality"]
    assert result.version.manifest.scoring is not None and result.version.manifest.scoring.activation == "sigmoid"
    publish_adder(ModelRepository(state / "models"))
    create_admin(state)
    with running_server(state, batching={"max_batch_size": 32}) as running:
        yield running


def torch_scores(folder: Path, query: str, documents: list[str]) -> np.ndarray:
    """What sentence-transformers' CrossEncoder computes for a one-label model: sigmoid(logit)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = BertForSequenceClassification.from_pretrained(str(folder)).eval()
    batch = tokenizer([query] * len(documents), documents, padding=True, truncation="only_second", max_length=128, return_tensors="pt")
    with torch.inference_mode():
        return torch.sigmoid(model(**batch).logits[:, 0]).numpy().astype(np.float64)


def rerank(server: RunningServer, body: dict[str, object], path: str = "/v1/rerank") -> httpx.Response:
    return httpx.post(server.url(path), json={"model": MODEL, **body}, headers=server.auth(), timeout=60)


def test_scores_and_order_equal_pytorch_and_every_path_answers(server: RunningServer, cross_encoder: Path) -> None:
    expected = torch_scores(cross_encoder, QUERY, DOCUMENTS)
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        response = rerank(server, {"query": QUERY, "documents": DOCUMENTS}, path)
        assert response.status_code == 200, response.text
        body = response.json()
        results = body["results"]
        assert [item["index"] for item in results] == list(np.argsort(-expected, kind="stable"))
        for item in results:
            assert item["relevance_score"] == pytest.approx(expected[item["index"]], abs=1e-5)
            assert item["document"]["text"] == DOCUMENTS[item["index"]]
        assert body["usage"]["prompt_tokens"] > len(DOCUMENTS) * 3 and body["truncated"] == []


def test_top_n_and_return_documents_and_object_documents(server: RunningServer) -> None:
    full = rerank(server, {"query": QUERY, "documents": DOCUMENTS}).json()["results"]
    body = {"query": QUERY, "documents": [{"text": text} for text in DOCUMENTS], "top_n": 2, "return_documents": False}
    top = rerank(server, body).json()["results"]
    assert [item["index"] for item in top] == [item["index"] for item in full[:2]]
    assert all(item["document"] is None for item in top)


def test_a_document_longer_than_the_model_is_cut_and_counted_never_refused(server: RunningServer) -> None:
    long_document = " ".join(["honey"] * 2000)
    response = rerank(server, {"query": QUERY, "documents": [DOCUMENTS[0], long_document]})
    assert response.status_code == 200 and response.json()["truncated"] == [1]
    capped = rerank(server, {"query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": 3})
    assert capped.status_code == 200 and set(capped.json()["truncated"]) == {i for i, d in enumerate(DOCUMENTS) if len(d.split()) > 3}


def test_a_thousand_documents_are_a_few_batches(server: RunningServer) -> None:
    def executions() -> float:
        text = httpx.get(server.url("/metrics")).text
        found = re.search(rf'nv_inference_exec_count_total\{{model="{MODEL}",version="\d+"\}} ([0-9.]+)', text)
        return float(found.group(1)) if found else 0.0

    before = executions()
    documents = [f"{DOCUMENTS[i % len(DOCUMENTS)]} {i}" for i in range(1000)]
    response = rerank(server, {"query": QUERY, "documents": documents, "top_n": 5})
    assert response.status_code == 200 and len(response.json()["results"]) == 5
    runs = executions() - before
    assert 1000 / 32 <= runs <= 1000 / 32 + 8, f"{runs} session runs for 1000 documents"


def test_bad_requests_are_400_naming_the_field(server: RunningServer) -> None:
    empty = rerank(server, {"query": QUERY, "documents": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents"
    wrong_task = httpx.post(server.url("/v1/rerank"), json={"model": "adder", "query": "x", "documents": ["y"]}, headers=server.auth(), timeout=30)
    assert wrong_task.status_code == 400 and wrong_task.json()["error"]["param"] == "model"
    assert "text-classification" in wrong_task.json()["error"]["message"]
    huge_query = rerank(server, {"query": "honey " * 500, "documents": ["x"]})
    assert huge_query.status_code == 400 and huge_query.json()["error"]["param"] == "query"
    assert rerank(server, {"query": QUERY, "documents": ["x"], "top_n": 0}).status_code == 400
    missing = httpx.post(server.url("/v1/rerank"), json={"model": "ghost", "query": "x", "documents": ["y"]}, headers=server.auth(), timeout=30)
    assert missing.status_code == 404
    v2_error = rerank(server, {"query": QUERY, "documents": []}, "/v2/rerank")
    assert v2_error.status_code == 400 and isinstance(v2_error.json()["error"], str)


def test_scoring_follows_the_activation_the_configuration_names() -> None:
    assert scoring_spec({}, ["LABEL_0"]).activation == "sigmoid"
    identity = {"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}
    assert scoring_spec(identity, ["LABEL_0"]).activation == "identity"
    nli = scoring_spec({}, ["contradiction", "entailment", "neutral"])
    assert (nli.activation, nli.label) == ("softmax", 1)
    logits = np.array([[0.0], [2.0]])
    np.testing.assert_allclose(relevance_scores(logits, "sigmoid", 0), [0.5, 1 / (1 + np.exp(-2.0))])
    np.testing.assert_allclose(relevance_scores(np.array([[0.0, 0.0]]), "softmax", 1), [0.5])
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_playground_reranks_in_the_browser(server: RunningServer) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = open_playground(browser, server.base_url, server.key or "", MODEL, "rerank")
            page.fill("#pg-input", QUERY)
            page.fill("#pg-documents", "\n".join(DOCUMENTS[:3]))
            page.click("#pg-send")
            page.wait_for_selector("#pg-status:has-text('documents ranked')")
            lines = page.inner_text("#pg-output").strip().splitlines()
            assert len(lines) == 3 and {line.split("  ", 1)[1] for line in lines} == set(DOCUMENTS[:3])
        finally:
            browser.close()


def test_appliance_bench_has_a_rerank_workload_priced_per_document(server: RunningServer) -> None:
    options = BenchOptions(
        model=MODEL, workload="rerank", url=server.base_url, api_key=server.key,
        concurrency=[2], duration_s=1.0, max_requests=6, warmup_requests=1, sentences=16,
    )
    result = run_bench(options, CostSettings())
    assert result.cost_unit == "inputs"
    (point,) = result.variants[0].points
    assert point.stats["ok"] == point.stats["requests"] > 0, point.error_samples
    assert point.stats["inputs"] == 16 * point.stats["ok"] and point.stats["prompt_tokens"] > 0
    assert point.cost["per_1k_inputs"] > 0
