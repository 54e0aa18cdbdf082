"""Faults of the serving side: a power cut under load, SIGTERM under load, and model files that
go bad (corrupted, deleted while loaded, a manifest that lies about shapes).

After kill -9 the restarted server serves again, the database passes `PRAGMA integrity_check`,
keys and audit events written before the cut are all there, every published model loads, and
no prompt text is in anything the crash left behind.
A broken model is marked failed with a readable reason while the others keep serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from appliance.repository.manifest import MANIFEST_FILE
from appliance.repository.store import ModelRepository
from tests.helpers.server import create_key, running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder, publish_heavy
from tests.reliability.conftest import SECRET_PROMPT_MARKER, TENSOR_MODEL, PreparedState, prepare_state
from tests.reliability.load import Call, run_load
from tests.reliability.served import ROOT, clean_env, integrity_ok, served, table_rows

ADDER_BODY = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]},
        {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 1.0, 1.0, 1.0]},
    ]
}
TINY_MIX = [
    Call("infer", f"/v2/models/{TENSOR_MODEL}/infer", ADDER_BODY),
    Call("embeddings", "/v1/embeddings", {"model": "tiny-embed", "input": [f"the cat sat {SECRET_PROMPT_MARKER}", "blue sky"]}),
]
LOAD_BEFORE_KILL_S = 3.0
#: Wide and deep enough that one heavy request runs for about a second on 2 cores: with 1024
#: (0.15 s) a loaded CI machine finished the first before the sixth had arrived.
HEAVY_WIDTH = 2048
HEAVY_LAYERS = 160
SIGTERM_CLIENTS = 6


def _infer(base_url: str, headers: dict[str, str], model: str = TENSOR_MODEL) -> httpx.Response:
    return httpx.post(f"{base_url}/v2/models/{model}/infer", json=ADDER_BODY, headers=headers, timeout=60)


def _snapshot(state: PreparedState) -> tuple[list[tuple], list[tuple]]:
    keys = table_rows(state.db_path, "SELECT name, key_sha256, scopes, revoked_at FROM api_keys ORDER BY id")
    audit = table_rows(state.db_path, "SELECT id, action, actor, target FROM audit_events ORDER BY id")
    return keys, audit


def test_kill_9_under_load_then_restart_serves_with_database_keys_audit_and_models_intact(tiny_state: PreparedState) -> None:
    revoked = create_key(tiny_state.state_dir, "to-revoke", ["infer"])
    with served(tiny_state.state_dir, tiny_state.key, log_name="before-kill.log") as first:
        # Audited events before the cut: refused keys (401) and a revoked key.
        assert _infer(first.base_url, {"Authorization": "Bearer not-a-key"}).status_code == 401
        subprocess_revoke(tiny_state.state_dir, "to-revoke")
        report_holder: list = []
        loader = threading.Thread(
            target=lambda: report_holder.append(run_load(first.base_url, first.auth(), TINY_MIX, clients=8, duration_s=LOAD_BEFORE_KILL_S * 2))
        )
        loader.start()
        deadline = time.monotonic() + 60
        while first.metric_sum("nv_inference_request_success_total") < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(LOAD_BEFORE_KILL_S)
        keys_before, audit_before = _snapshot(tiny_state)
        first.kill9()
        loader.join(timeout=180)
    assert audit_before, "nothing was audited before the cut"
    with served(tiny_state.state_dir, tiny_state.key, log_name="after-kill.log") as second:
        assert integrity_ok(tiny_state.db_path)
        keys_after, audit_after = _snapshot(tiny_state)
        assert keys_after[: len(keys_before)] == keys_before
        assert audit_after[: len(audit_before)] == audit_before
        for name in ModelRepository(tiny_state.state_dir / "models").names():
            ready = httpx.get(second.url(f"/v2/models/{name}/ready"), headers=second.auth(), timeout=30)
            assert ready.status_code == 200, (name, ready.text)
        answer = _infer(second.base_url, second.auth())
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
        assert _infer(second.base_url, second.auth(revoked)).status_code == 401
        assert second.terminate() == 0
    assert integrity_ok(tiny_state.db_path)
    # Nothing the crash left behind (WAL, logs of both runs) holds prompt text.
    marker = SECRET_PROMPT_MARKER.encode()
    files = [p for p in tiny_state.state_dir.parent.rglob("*") if p.is_file() and "models" not in p.relative_to(tiny_state.state_dir.parent).parts]
    assert files and [str(p) for p in files if marker in p.read_bytes()] == []


def subprocess_revoke(state_dir: Path, name: str) -> None:
    """Revoke through the real command line, as an admin would while the server runs."""
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "revoke", name], cwd=ROOT, env=clean_env(state_dir),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_sigterm_under_load_finishes_in_flight_work_answers_503_to_new_and_exits_0(tmp_path: Path) -> None:
    """Heavy requests the server holds when SIGTERM arrives all finish with 200 while light
    clients keep coming: those get 200 until the drain starts, then 503, then find the port
    closed once the process has exited. No connection is ever dropped without an answer."""
    state = prepare_state(tmp_path / "state")
    publish_heavy(ModelRepository(state.state_dir / "models"), width=HEAVY_WIDTH, layers=HEAVY_LAYERS)
    heavy_body = {"inputs": [{"name": "X", "shape": [32, HEAVY_WIDTH], "datatype": "FP32", "data": np.zeros(32 * HEAVY_WIDTH).tolist()}]}
    held: list[int | str] = []
    light: list[int | str] = []
    lock = threading.Lock()

    def post(http: httpx.Client, url: str, body: dict[str, object]) -> int | str:
        try:
            return http.post(url, json=body).status_code
        except httpx.ConnectError:
            return "refused"  # the server stopped listening: expected once it has exited
        except httpx.TransportError as exc:
            return f"dropped: {exc.__class__.__name__}"

    def heavy_client(base_url: str, headers: dict[str, str]) -> None:
        with httpx.Client(headers=headers, timeout=180) as http:
            status = post(http, f"{base_url}/v2/models/heavy/infer", heavy_body)
        with lock:
            held.append(status)

    def light_client(base_url: str, headers: dict[str, str]) -> None:
        told_to_go = False
        with httpx.Client(headers=headers, timeout=60) as http:
            for _ in range(10_000):
                status = post(http, f"{base_url}/v2/models/{TENSOR_MODEL}/infer", ADDER_BODY)
                if told_to_go and str(status).startswith("dropped"):
                    # After a 503 the client knows the server is going: a connection the kernel
                    # still queued when the listener closed is reset, which is a refusal.
                    status = "refused"
                with lock:
                    light.append(status)
                if status == "refused" or str(status).startswith("dropped"):
                    return
                if status == 503:
                    told_to_go = True
                    time.sleep(0.05)

    with served(state.state_dir, state.key, APPLIANCE_DRAIN_GRACE_S="120") as server:
        heavy = [threading.Thread(target=heavy_client, args=(server.base_url, server.auth())) for _ in range(SIGTERM_CLIENTS)]
        lights = [threading.Thread(target=light_client, args=(server.base_url, server.auth())) for _ in range(4)]
        for thread in heavy:
            thread.start()
        deadline = time.monotonic() + 60
        # Every heavy request accepted (plus this /metrics request), before any light client.
        while server.metric_sum("appliance_http_inflight_requests") < SIGTERM_CLIENTS + 1:
            assert time.monotonic() < deadline, "the heavy requests never got in flight together"
            time.sleep(0.02)
        for thread in lights:
            thread.start()
        while len(light) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        code = server.terminate(timeout_s=180)
        for thread in [*heavy, *lights]:
            thread.join(timeout=180)
    print(f"held: {held}; light: {sorted(set(map(str, light)))} over {len(light)} requests")
    assert code == 0
    assert held == [200] * SIGTERM_CLIENTS
    assert set(light) <= {200, 503, "refused"}, sorted(set(map(str, light)))
    assert 503 in light


def _lie_about_shapes(version_path: Path) -> None:
    manifest = json.loads((version_path / MANIFEST_FILE).read_text())
    for spec in manifest["inputs"] + manifest["outputs"]:
        spec["shape"] = [-1, 8]
    (version_path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_corrupted_deleted_and_lying_models_fail_with_a_reason_while_the_rest_keep_serving(state_dir: Path) -> None:
    repository = ModelRepository(state_dir / "models")
    publish_adder(repository)
    publish_embedder(repository)
    corrupt = publish_adder(repository, "corrupt")
    (corrupt.path / "model.onnx").write_bytes(os.urandom(4096))
    _lie_about_shapes(publish_adder(repository, "liar").path)
    truncated = publish_heavy(repository, "truncated", width=64, layers=2)
    with open(truncated.path / "model.onnx", "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) // 2)
    doomed = publish_adder(repository, "doomed")
    with running_server(state_dir) as server:
        states = {entry["name"]: entry for entry in httpx.post(server.url("/v2/repository/index"), headers=server.auth()).json()}
        assert states["adder"]["state"] == states["tiny-embed"]["state"] == states["doomed"]["state"] == "READY"
        assert states["corrupt"]["state"] == "UNAVAILABLE" and "not a readable ONNX file" in states["corrupt"]["reason"]
        assert states["truncated"]["state"] == "UNAVAILABLE" and "failed to load" in states["truncated"]["reason"]
        assert states["liar"]["state"] == "UNAVAILABLE" and "dimension 1 = 8, the graph fixes it at 4" in states["liar"]["reason"]
        refused = httpx.post(server.url("/v2/models/liar/infer"), json=ADDER_BODY, headers=server.auth())
        assert refused.status_code == 503 and "graph fixes it" in refused.json()["error"]

        shutil.rmtree(doomed.path)  # deleted while loaded, then someone asks for a reload
        reload = httpx.post(server.url("/v2/repository/models/doomed/load"), headers=server.auth())
        assert reload.status_code == 404
        gone = httpx.post(server.url("/v2/models/doomed/infer"), json=ADDER_BODY, headers=server.auth())
        assert gone.status_code == 503 and "removed from the model repository" in gone.json()["error"]

        ok = _infer(server.base_url, server.auth())
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
        embedded = httpx.post(server.url("/v1/embeddings"), json={"model": "tiny-embed", "input": "blue sky"}, headers=server.auth())
        assert embedded.status_code == 200
        assert httpx.get(server.url("/v2/health/ready")).status_code == 200


def test_model_file_corrupted_while_loaded_keeps_the_old_session_and_reports_the_failed_reload(state_dir: Path) -> None:
    repository = ModelRepository(state_dir / "models")
    version = publish_adder(repository)
    with running_server(state_dir) as server:
        (version.path / "model.onnx").write_bytes(b"\x00garbage" * 64)
        reload = httpx.post(server.url(f"/v2/repository/models/{TENSOR_MODEL}/load"), headers=server.auth())
        assert reload.status_code == 200 and "reload failed" in (reload.json()["reason"] or "")
        assert "not a readable ONNX file" in reload.json()["reason"]
        assert _infer(server.base_url, server.auth()).status_code == 200
