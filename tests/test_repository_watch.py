"""The server follows the model repository while it runs (appliance/serving/watch.py): a version
published or re-defaulted by another process is served within a few polls, a new model comes
up, a removed one stops serving, and a model an admin undeployed stays undeployed. Real server,
real HTTP, real ONNX Runtime sessions."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from appliance.config import load_settings
from appliance.repository import ModelRepository
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.migrate import upgrade
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tiny_models import publish_adder, publish_identity

POLL_S = 0.2
WAIT_S = 15.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def serving(server: RunningServer, name: str) -> tuple[str | None, int | None]:
    """(state in lower case, version in memory) of `name`."""
    state = server.state(name)
    return (state, server.status(name).loaded_version) if state is not None else (None, None)


def add(server: RunningServer) -> list[float]:
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]},
        ]
    }
    response = httpx.post(server.url("/v2/models/adder/infer"), json=body, headers=server.auth(), timeout=10)
    assert response.status_code == 200, response.text
    return next(out["data"] for out in response.json()["outputs"] if out["name"] == "OUTPUT0")


def test_versions_published_or_re_defaulted_while_serving_are_loaded(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    publish_adder(repository)
    with running_server(tmp_path, repository_poll_s=POLL_S) as server:
        assert serving(server, "adder") == ("ready", 1)
        publish_adder(repository)  # as `appliance export` in another process would
        wait_for(lambda: serving(server, "adder") == ("ready", 2), "version 2 to serve")
        assert add(server) == [2, 3, 4, 5]
        repository.set_default("adder", 1)  # as `appliance models set-default adder 1` would
        wait_for(lambda: serving(server, "adder") == ("ready", 1), "version 1 to serve again")
        assert add(server) == [2, 3, 4, 5]


def test_a_new_model_comes_up_and_a_removed_one_stops_serving(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    publish_adder(repository)
    with running_server(tmp_path, repository_poll_s=POLL_S) as server:
        publish_identity(repository)
        wait_for(lambda: serving(server, "identity")[0] == "ready", "the new model to load")
        ready = httpx.get(server.url("/v2/models/identity/ready"), headers=server.auth(), timeout=10)
        assert ready.status_code == 200
        repository.delete("adder")
        wait_for(lambda: serving(server, "adder")[0] == "unavailable", "the removed model to stop")
        assert "removed" in (server.status("adder").reason or "")
        gone = httpx.post(server.url("/v2/models/adder/infer"), json={"inputs": []}, headers=server.auth(), timeout=10)
        # Kept as a failed entry (not forgotten) so the index and the admin UI say why.
        assert gone.status_code == 503 and "removed" in gone.text


def test_an_undeployed_model_stays_undeployed_and_polling_can_be_off(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    publish_adder(repository)
    publish_identity(repository)
    database = Database(load_settings(state_dir=tmp_path).db_url)
    upgrade(database)
    DeploymentStore(database).set("adder", False, actor="admin", address="127.0.0.1")
    database.close()
    with running_server(tmp_path, repository_poll_s=POLL_S) as server:
        assert serving(server, "adder")[0] == "unavailable"
        unloaded = httpx.post(server.url("/v2/repository/models/identity/unload"), headers=server.auth(), timeout=10)
        assert unloaded.status_code == 200, unloaded.text
        publish_adder(repository)
        publish_identity(repository)
        time.sleep(10 * POLL_S)
        assert serving(server, "adder")[0] == "unavailable", "an admin's undeploy outlives new versions"
        assert serving(server, "identity")[0] == "unavailable", "so does an unload through the repository API"
    with running_server(tmp_path, repository_poll_s=0, create_keys={"second": ["infer", "admin"]}) as server:
        publish_identity(repository)
        time.sleep(1.0)
        assert serving(server, "identity") == ("ready", 2), "with polling off only an explicit load reloads"
        loaded = httpx.post(server.url("/v2/repository/models/identity/load"), headers=server.auth(server.keys["second"]), timeout=10)
        assert loaded.status_code == 200 and serving(server, "identity") == ("ready", 3)


def test_a_generation_model_follows_its_default_version(tiny_decoders: TinyDecoders, tmp_path: Path) -> None:
    shutil.copytree(tiny_decoders.state_dir / "models", tmp_path / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    repository = ModelRepository(tmp_path / "models")
    fp32, int4 = tiny_decoders.llama_fp32.version, tiny_decoders.llama_int4.version
    repository.set_default("tiny-llama", fp32)
    with running_server(tmp_path, repository_poll_s=POLL_S) as server:
        assert serving(server, "tiny-llama") == ("ready", fp32)
        repository.set_default("tiny-llama", int4)
        wait_for(lambda: serving(server, "tiny-llama") == ("ready", int4), "int4 to serve")
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.auth(), timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
