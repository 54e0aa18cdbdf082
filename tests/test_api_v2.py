"""Open Inference Protocol (KServe V2) over real HTTP: health, metadata, JSON and binary
inference, the repository extension, keys and scopes, and every kind of bad input."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from appliance.repository.store import ModelRepository
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import IDENTITY_TYPES, publish_adder, publish_embedder, publish_identity


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("v2-state")
    repo = ModelRepository(state / "models")
    publish_adder(repo)
    publish_identity(repo)
    publish_embedder(repo)
    broken = publish_adder(repo, "broken")
    broken.model_path.write_bytes(b"\x00garbage")
    with running_server(
        state,
        create_keys={"all": ["infer", "admin", "metrics"], "infer-only": ["infer"], "metrics-only": ["metrics"]},
        max_body_bytes=64 * 1024,
    ) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.auth()) as http:
        yield http


def _adder_body(rows: int = 1, **extra: object) -> dict:
    values = list(range(rows * 4))
    return {
        "inputs": [
            {"name": "INPUT0", "shape": [rows, 4], "datatype": "FP32", "data": values},
            {"name": "INPUT1", "shape": [rows, 4], "datatype": "FP32", "data": [1] * rows * 4},
        ],
        **extra,
    }


def test_liveness_and_readiness_answer_without_a_key(server: RunningServer) -> None:
    assert httpx.get(server.url("/v2/health/live")).json() == {"live": True}
    ready = httpx.get(server.url("/v2/health/ready"))
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_server_metadata_lists_the_extensions(client: httpx.Client) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "inference-appliance" and "binary_tensor_data" in body["extensions"]


def test_model_metadata_shows_signature_provider_and_fallback_reasons(client: httpx.Client) -> None:
    body = client.get("/v2/models/adder").json()
    assert body["state"] == "READY" and body["versions"] == ["1"]
    assert body["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}
    assert body["provider"]["active"] == "cpu"
    assert set(body["provider"]["fallbacks"]) == {"tensorrt", "cuda"}
    assert client.get("/v2/models/adder/versions/1").status_code == 200


def test_json_inference_echoes_id_and_parameters(client: httpx.Client) -> None:
    response = client.post("/v2/models/adder/infer", json=_adder_body(2, id="req-7", parameters={"trace": "abc"}))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-7" and body["parameters"] == {"trace": "abc"}
    assert body["model_name"] == "adder" and body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["OUTPUT0"]["data"] == [float(v + 1) for v in range(8)] and out["OUTPUT0"]["shape"] == [2, 4]


def test_outputs_selection_returns_only_the_named_output(client: httpx.Client) -> None:
    body = client.post("/v2/models/adder/versions/1/infer", json=_adder_body(outputs=[{"name": "OUTPUT1"}])).json()
    assert [o["name"] for o in body["outputs"]] == ["OUTPUT1"]


def test_every_datatype_round_trips_through_json(client: httpx.Client) -> None:
    samples = {
        "FP32": [1.5, -2.0], "FP16": [0.5, 2.0], "INT64": [2**40, -3], "INT32": [7, -7], "INT8": [-128, 127],
        "UINT8": [0, 255], "BOOL": [True, False], "BYTES": ["héllo", ""],
    }
    body = {"inputs": [{"name": f"IN_{t}", "shape": [1, 2], "datatype": t, "data": v} for t, v in samples.items()]}
    response = client.post("/v2/models/identity/infer", json=body)
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    for datatype, values in samples.items():
        assert out[f"OUT_{datatype}"]["datatype"] == datatype
        assert out[f"OUT_{datatype}"]["data"] == values


def test_official_tritonclient_works_unchanged_with_binary_data(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.base_url.removeprefix("http://"))
    headers = server.auth()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity", headers=headers)
    assert client.get_model_metadata("identity", headers=headers)["name"] == "identity"
    arrays = {
        "FP32": np.array([[1.5, -2]], np.float32), "FP16": np.array([[0.5, 2]], np.float16),
        "INT64": np.array([[2**40, -3]], np.int64), "INT32": np.array([[7, -7]], np.int32),
        "INT8": np.array([[-128, 127]], np.int8), "UINT8": np.array([[0, 255]], np.uint8),
        "BOOL": np.array([[True, False]]), "BYTES": np.array([[b"h\xc3\xa9llo", b"\x00ok"]], dtype=object),
    }
    inputs = []
    for index, (datatype, array) in enumerate(arrays.items()):
        item = triton.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=index % 2 == 0 or datatype == "BYTES")  # binary and JSON mixed
        inputs.append(item)
    outputs = [triton.InferRequestedOutput(f"OUT_{d}", binary_data=i % 3 != 0) for i, d in enumerate(IDENTITY_TYPES)]
    result = client.infer("identity", inputs, outputs=outputs, headers=headers, request_id="tc-1")
    assert result.get_response()["id"] == "tc-1"
    for datatype, array in arrays.items():
        got = result.as_numpy(f"OUT_{datatype}")
        np.testing.assert_array_equal(got, array)
    all_binary = client.infer("adder", [_triton_fp32("INPUT0", 3), _triton_fp32("INPUT1", 3)], headers=headers)
    np.testing.assert_allclose(all_binary.as_numpy("OUTPUT0"), np.full((3, 4), 2.0))


def _triton_fp32(name: str, rows: int) -> triton.InferInput:
    item = triton.InferInput(name, [rows, 4], "FP32")
    item.set_data_from_numpy(np.ones((rows, 4), np.float32))
    return item


def test_tritonclient_sees_errors_as_exceptions_with_the_message(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.base_url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("nope", headers=server.auth())


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"", 400, "empty request body"),
        (json.dumps({"inputs": []}).encode(), 400, "inputs"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}, {"name": "INPUT1", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(), 400, "input 'INPUT0': dimension 1 must be 4"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}).encode(), 400, "input 'INPUT0': datatype INT64 does not match the model's FP32"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}, {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}).encode(), 400, "input 'INPUT0': FP32 data must be numbers"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}, {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}).encode(), 400, "needs 4 elements"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode(), 400, "input 'INPUT1' is missing"),
        (json.dumps({"inputs": [{"name": "SECRET", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(), 400, "input 'SECRET' is not an input"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [0, 4], "datatype": "FP32", "data": []}, {"name": "INPUT1", "shape": [0, 4], "datatype": "FP32", "data": []}]}).encode(), 400, "is empty"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP99", "data": [1, 2, 3, 4]}]}).encode(), 400, "inputs.0.datatype"),
        (json.dumps(_adder_body(outputs=[{"name": "NOPE"}])).encode(), 400, "output 'NOPE' is not an output"),
        (json.dumps(_adder_body(40)).encode(), 400, "max_batch_size 32"),
    ],
)
def test_bad_inference_requests_answer_4xx_naming_the_problem(client: httpx.Client, body: bytes, status: int, fragment: str) -> None:
    response = client.post("/v2/models/adder/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_bytes_where_numbers_belong_is_refused_in_binary_form_too(client: httpx.Client) -> None:
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 5}},
        {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
    ]}).encode()
    response = client.post("/v2/models/adder/infer", content=header + b"hello", headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "needs 16 bytes, got 5" in response.json()["error"]


def test_unknown_model_or_version_is_404(client: httpx.Client) -> None:
    assert client.post("/v2/models/nope/infer", json=_adder_body()).status_code == 404
    assert client.get("/v2/models/adder/versions/9").status_code == 404
    assert client.get("/v2/models/adder/versions/x").status_code == 404
    # Unicode digits pass str.isdigit() but are not versions (schemathesis found a 500 here).
    assert client.get("/v2/models/adder/versions/%C2%B9").status_code == 404
    assert client.post("/v2/models/adder/versions/%D9%A3/infer", json=_adder_body()).status_code == 404
    assert client.post("/v2/models/adder/versions/9/infer", json=_adder_body()).status_code == 404
    assert client.get("/v2/no/such/route").json() == {"error": "no route /v2/no/such/route"}


def test_body_over_the_limit_is_413_with_or_without_an_honest_content_length(server: RunningServer, client: httpx.Client) -> None:
    big = b"{" + b" " * (70 * 1024) + b"}"
    declared = client.post("/v2/models/adder/infer", content=big)
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length at all
        for _ in range(70):
            yield b" " * 1024

    chunked = client.post("/v2/models/adder/infer", content=chunks())
    assert chunked.status_code == 413
    # A Content-Length that lies low: the server reads what was declared, never more.
    with socket.create_connection(("127.0.0.1", server.settings.port)) as sock:
        sock.sendall(
            b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.key.encode()
            + b"\r\nContent-Length: 10\r\nConnection: close\r\n\r\n" + b"x" * 100
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    assert client.get("/v2/health/live").status_code == 200


def test_missing_or_bad_key_is_401_and_missing_scope_is_403(server: RunningServer) -> None:
    url = server.url("/v2/models/adder/infer")
    assert httpx.post(url, json=_adder_body()).status_code == 401
    wrong = httpx.post(url, json=_adder_body(), headers={"Authorization": "Bearer apl_000000000000_" + "x" * 43})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.post(url, json=_adder_body(), headers={"Authorization": "Basic abc"}).status_code == 401
    metrics_only = httpx.post(url, json=_adder_body(), headers=server.auth(server.keys["metrics-only"]))
    assert metrics_only.status_code == 403 and "infer" in metrics_only.json()["error"]
    index = httpx.post(server.url("/v2/repository/index"), headers=server.auth(server.keys["infer-only"]))
    assert index.status_code == 403


def test_failed_model_is_reported_while_the_others_keep_serving(client: httpx.Client) -> None:
    meta = client.get("/v2/models/broken").json()
    assert meta["state"] == "UNAVAILABLE" and "failed to load" in meta["reason"] and "not a readable ONNX file" in meta["reason"]
    response = client.post("/v2/models/broken/infer", json=_adder_body())
    assert response.status_code == 503 and "failed" in response.json()["error"]
    assert client.get("/v2/models/broken/ready").status_code == 503
    assert client.post("/v2/models/adder/infer", json=_adder_body()).status_code == 200
    assert "broken" in client.get("/metrics").text


def test_repository_extension_indexes_unloads_and_loads_with_admin_scope(client: httpx.Client) -> None:
    index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
    assert index["adder"]["state"] == "READY" and index["broken"]["state"] == "UNAVAILABLE"
    assert [e["name"] for e in client.post("/v2/repository/index", json={"ready": False}).json()] == ["broken"]
    assert client.post("/v2/repository/models/identity/unload").json()["state"] == "UNAVAILABLE"
    assert client.get("/v2/models/identity/ready").status_code == 503
    not_ready = client.post("/v2/models/identity/infer", json={"inputs": [{"name": "IN_FP32", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
    assert not_ready.status_code == 503
    assert client.post("/v2/repository/models/identity/load").json()["state"] == "READY"
    assert client.get("/v2/models/identity/ready").status_code == 200
    failed = client.post("/v2/repository/models/broken/load")
    assert failed.status_code == 400 and "failed to load" in failed.json()["error"]
    assert client.post("/v2/repository/models/ghost/load").status_code == 404


def test_metrics_count_requests_batches_and_loaded_models_with_provider(server: RunningServer, client: httpx.Client) -> None:
    client.post("/v2/models/adder/infer", json=_adder_body())
    client.post("/v2/models/adder/infer", json={"inputs": []})
    text = client.get("/metrics").text
    assert 'nv_inference_request_success_total{model="adder",version="1"}' in text
    assert 'nv_inference_request_failure_total{model="adder",reason="400",version="1"}' in text
    assert 'nv_model_loaded{model="adder",provider="cpu",version="1"} 1.0' in text
    assert "nv_inference_batch_size_bucket" in text and "nv_inference_queue_duration_seconds_bucket" in text
    assert "nv_inference_compute_infer_duration_seconds_count" in text
    # From loopback (an admin network) no key is needed; a metrics key works anyway.
    assert httpx.get(server.url("/metrics")).status_code == 200
