"""OpenAI-compatible routes over real HTTP: /v1/models and /v1/embeddings with the official
`openai` client (only base_url and api_key set), token-id input, base64, dimensions,
reported truncation, and OpenAI-shaped errors (400 with param, never 422)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from appliance.repository.store import ModelRepository
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import EMBED_SPECIALS, EMBED_WORDS, embed_reference, embedder_table, publish_adder, publish_embedder

VOCAB = {token: i for i, token in enumerate(EMBED_SPECIALS + EMBED_WORDS)}


def _ids(text: str) -> list[int]:
    return [VOCAB["[CLS]"], *(VOCAB.get(word, VOCAB["[UNK]"]) for word in text.split()), VOCAB["[SEP]"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("openai-state")
    repo = ModelRepository(state / "models")
    publish_embedder(repo)
    publish_embedder(repo, "fixed-dim", min_dimensions=None)
    publish_adder(repo)
    with running_server(state) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=server.key, max_retries=0)


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.auth()) as c:
        yield c


def test_models_lists_the_ready_models(client: openai.OpenAI) -> None:
    assert {model.id for model in client.models.list()} == {"tiny-embed", "fixed-dim", "adder"}


def test_official_client_embeddings_match_the_numpy_reference(client: openai.OpenAI) -> None:
    texts = ["hello world", "the cat sat on the mat", "blue sky"]
    response = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
    table = embedder_table()
    assert [item.index for item in response.data] == [0, 1, 2]
    for text, item in zip(texts, response.data, strict=True):
        np.testing.assert_allclose(item.embedding, embed_reference(table, _ids(text)), rtol=1e-5, atol=1e-6)
    assert response.usage.prompt_tokens == sum(len(_ids(t)) for t in texts)
    floats = client.embeddings.create(model="tiny-embed", input="red car", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, embed_reference(table, _ids("red car")), rtol=1e-5, atol=1e-6)


def test_base64_encoding_is_little_endian_float32(http: httpx.Client) -> None:
    body = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": "cat", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, embed_reference(embedder_table(), _ids("cat")), rtol=1e-5, atol=1e-6)


def test_token_id_input_single_and_batched(http: httpx.Client) -> None:
    table = embedder_table()
    single = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": _ids("dog"), "encoding_format": "float"}).json()
    np.testing.assert_allclose(single["data"][0]["embedding"], embed_reference(table, _ids("dog")), rtol=1e-5, atol=1e-6)
    batch = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": [_ids("dog"), _ids("fast car")]}).json()
    assert len(batch["data"]) == 2 and batch["usage"]["prompt_tokens"] == 3 + 4
    bad = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": [[2, 99999, 3]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_dimensions_truncates_and_renormalises_where_the_model_allows(http: httpx.Client) -> None:
    body = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": "hello world", "dimensions": 4}).json()
    vector = np.array(body["data"][0]["embedding"])
    assert vector.shape == (4,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    refused = http.post("/v1/embeddings", json={"model": "fixed-dim", "input": "hello", "dimensions": 4})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
    too_big = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": "hello", "dimensions": 9})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "dimensions"


def test_truncation_to_max_length_is_reported_not_silent(http: httpx.Client) -> None:
    long_text = " ".join(["cat"] * 40)
    body = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["dog", long_text]}).json()
    assert body["truncated"] == [1]
    assert body["usage"]["prompt_tokens"] == 3 + 16  # cut to max_length 16, [CLS]/[SEP] kept
    table = embedder_table()
    kept = [VOCAB["[CLS]"]] + [VOCAB["cat"]] * 14 + [VOCAB["[SEP]"]]
    np.testing.assert_allclose(body["data"][1]["embedding"], embed_reference(table, kept), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"input": "hi"}, "model", "field required"),
        ({"model": "tiny-embed"}, "input", "field required"),
        ({"model": "tiny-embed", "input": []}, "input", "must not be empty"),
        ({"model": "tiny-embed", "input": [""]}, "input", "empty string"),
        ({"model": "tiny-embed", "input": [1.5]}, "input", ""),
        ({"model": "tiny-embed", "input": "x", "encoding_format": "hex"}, "encoding_format", ""),
        ({"model": "tiny-embed", "input": "x", "dimensions": 0}, "dimensions", ""),
        ({"model": "tiny-embed", "input": "x", "surprise": 1}, "surprise", ""),
        ({"model": "adder", "input": "x"}, "model", "serves feature-extraction models"),
    ],
)
def test_invalid_embedding_requests_are_400_naming_the_param(http: httpx.Client, body: dict, param: str, fragment: str) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_malformed_json_is_400_in_openai_shape(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]


def test_unknown_model_and_missing_key_use_openai_errors(server: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    anonymous = openai.OpenAI(base_url=server.url("/v1"), api_key="apl_000000000000_" + "y" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    response = httpx.get(server.url("/v1/models"))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_openapi_documents_every_route_and_no_422(server: RunningServer) -> None:
    schema = httpx.get(server.url("/openapi.json")).json()
    for path in ("/v2/models/{name}/infer", "/v2/repository/index", "/v1/embeddings", "/v1/models", "/metrics"):
        assert path in schema["paths"]
    assert "InferenceRequest" in schema["components"]["schemas"]
    assert all("422" not in op.get("responses", {}) for ops in schema["paths"].values() for op in ops.values())
