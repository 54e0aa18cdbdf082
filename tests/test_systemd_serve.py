"""The unit's exact ExecStart= command, run by hand the way systemd would run it.

The service is staged with `install-service --root`; the command line, Environment=,
EnvironmentFile= and the variables systemd adds (STATE_DIRECTORY, NOTIFY_SOCKET,
WATCHDOG_USEC, ...) come from the installed unit, with a clean environment, umask 0077 and
the MemoryDenyWriteExecute seccomp filter. A datagram socket plays systemd's notify socket.
The only change an admin would also make: the port (and loopback) in the staged env file.
It runs as the invoking user: tests never create system users (docs/SERVICE.md records the
run as the real `appliance` user on a box installed for real).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import httpx
import numpy as np
import pytest
from helpers.sandbox import sandboxed

from appliance.cli.service_cmd import migrate_database
from appliance.ops.install import InstallOptions, ServiceInstaller, execute
from appliance.ops.service_files import ServicePaths

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the sandbox's seccomp filter is written for Linux x86-64",
)

#: Generous bounds for a loaded 2-core box; the issue asks for a restart within 10 s.
READY_TIMEOUT_S = 120.0
RESTART_BOUND_S = 10.0
#: A short watchdog so the test sees heartbeats (the unit's 30 s would mean one every 15 s).
TEST_WATCHDOG_USEC = 2_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class StagedService:
    paths: ServicePaths
    unit_text: str
    port: int
    notify_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.paths.on_disk(self.paths.state_dir)

    def directive(self, key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", self.unit_text, re.M)

    def argv(self) -> list[str]:
        """ExecStart= with the box's absolute paths mapped into the staging root."""
        words = shlex.split(self.directive("ExecStart")[0])
        return [str(self.paths.on_disk(PurePosixPath(w))) if w.startswith("/") else w for w in words]

    def environment(self) -> dict[str, str]:
        """What systemd gives the process: its own variables, Environment=, then EnvironmentFile=."""
        on_disk = self.paths.on_disk
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.state_dir),
            "INVOCATION_ID": "0" * 32,
            "STATE_DIRECTORY": str(self.state_dir),
            "CACHE_DIRECTORY": str(on_disk(self.paths.cache_dir)),
            "LOGS_DIRECTORY": str(on_disk(self.paths.logs_dir)),
            "CONFIGURATION_DIRECTORY": str(on_disk(self.paths.config_dir)),
            "NOTIFY_SOCKET": str(self.notify_path),
            "WATCHDOG_USEC": str(TEST_WATCHDOG_USEC),
        }
        specifiers = {"%C": str(on_disk(PurePosixPath("/var/cache")))}
        for line in self.directive("Environment"):
            for assignment in shlex.split(line):
                key, value = assignment.split("=", 1)
                for specifier, replacement in specifiers.items():
                    value = value.replace(specifier, replacement)
                env[key] = value
        env_file = self.directive("EnvironmentFile")[0].lstrip("-")
        for line in on_disk(PurePosixPath(env_file)).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip()
        return env

    def stop_timeout_s(self) -> float:
        return float(self.directive("TimeoutStopSec")[0].rstrip("s"))

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            sandboxed(self.argv()),
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",  # WorkingDirectory= is unset: systemd starts services in /
            start_new_session=True,
        )


@pytest.fixture
def service(tmp_path: Path) -> StagedService:
    paths = ServicePaths(root=tmp_path / "root")
    installer = ServiceInstaller(InstallOptions(paths=paths, gpu=False), migrate=migrate_database)
    execute(installer.plan_install(), dry_run=False, echo=lambda _line: None)
    port = _free_port()
    env_file = paths.on_disk(paths.env_file)
    env_file.write_text(env_file.read_text() + f"APPLIANCE_HOST=127.0.0.1\nAPPLIANCE_PORT={port}\n")
    unit_text = paths.on_disk(paths.unit_file).read_text()
    return StagedService(paths=paths, unit_text=unit_text, port=port, notify_path=tmp_path / "notify.sock")


@pytest.fixture
def notify_socket(service: StagedService) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(service.notify_path))
    yield sock
    sock.close()


def _wait_for(sock: socket.socket, field: str, process: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """Datagrams until one carries `field`; fails early if the server died."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"server exited {process.returncode} before {field}: {err[-3000:]}")
        sock.settimeout(0.5)
        try:
            message = sock.recv(4096).decode().split("\n")
        except TimeoutError:
            continue
        seen.extend(message)
        if field in message:
            return seen
    pytest.fail(f"no {field} within {timeout_s} s; got {seen}")


def _stop(process: subprocess.Popen[str], timeout_s: float) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"no exit within TimeoutStopSec={timeout_s} s after SIGTERM")
    return process.returncode, err


def test_exec_start_serves_sends_ready_and_heartbeats_then_drains_on_sigterm(
    service: StagedService, notify_socket: socket.socket
) -> None:
    process = service.start()
    try:
        before_ready = _wait_for(notify_socket, "READY=1", process, READY_TIMEOUT_S)
        assert any(line.startswith("STATUS=") for line in before_ready)
        ready = httpx.get(f"{service.base_url}/v2/health/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        _wait_for(notify_socket, "WATCHDOG=1", process, TEST_WATCHDOG_USEC / 1e6 * 3)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    code, stderr = _stop(process, service.stop_timeout_s())
    assert code == 0, stderr[-3000:]
    _wait_for_after_exit(notify_socket, "STOPPING=1")
    assert "Traceback" not in stderr


def _wait_for_after_exit(sock: socket.socket, field: str) -> None:
    sock.settimeout(0.1)
    seen: list[str] = []
    try:
        while True:
            seen.extend(sock.recv(4096).decode().split("\n"))
    except TimeoutError:
        pass
    assert field in seen, seen


# -- kill -9 under load, then restart -----------------------------------------------------------
def _publish_tiny_model(service: StagedService) -> None:
    """A real ONNX graph (MatMul + Softmax) published through the repository's atomic path."""
    from onnx import TensorProto, helper

    from appliance.repository.manifest import Manifest, SourceInfo, TensorSpec
    from appliance.repository.store import ModelRepository

    settings_models = service.state_dir / "models"
    repository = ModelRepository(settings_models)
    staged = repository.staging_dir() / "tiny"
    staged.mkdir(parents=True)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (staged / "model.onnx").write_bytes(model.SerializeToString())
    manifest = Manifest(
        name="tiny",
        version=1,
        task="tensor",
        source=SourceInfo(kind="onnx", uri="tests/test_systemd_serve.py", sha256="0" * 64),
        created_at=datetime.now(UTC).isoformat(),
        opset=17,
        quantization="fp32",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 3])],
    )
    repository.publish(staged, manifest, None)


def _api_key(service: StagedService) -> str:
    from appliance.store import Database, KeyStore

    database = Database(f"sqlite:///{service.state_dir / 'appliance.db'}")
    try:
        key, _ = KeyStore(database).create("restart-test")
    finally:
        database.close()
    return key


INFER_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}


def _hammer(url: str, key: str, stop: threading.Event, answered: list[int]) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=5) as client:
        while not stop.is_set():
            try:
                answered.append(client.post(url, json=INFER_BODY).status_code)
            except httpx.HTTPError:
                answered.append(0)


def test_kill_9_under_load_then_restart_serves_within_10_s_with_database_intact(
    service: StagedService, notify_socket: socket.socket
) -> None:
    _publish_tiny_model(service)
    key = _api_key(service)
    infer_url = f"{service.base_url}/v2/models/tiny/infer"

    first = service.start()
    stop, answered = threading.Event(), []
    workers = [threading.Thread(target=_hammer, args=(infer_url, key, stop, answered)) for _ in range(4)]
    try:
        _wait_for(notify_socket, "READY=1", first, READY_TIMEOUT_S)
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 30
        while answered.count(200) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered.count(200) >= 20, f"no load got through: {sorted(set(answered))}"
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    finally:
        stop.set()
        for worker in workers:
            if worker.is_alive():
                worker.join()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    restarted_at = time.monotonic()
    second = service.start()
    try:
        served_after_s = None
        while time.monotonic() - restarted_at < RESTART_BOUND_S * 3:
            try:
                response = httpx.post(infer_url, json=INFER_BODY, headers={"Authorization": f"Bearer {key}"}, timeout=5)
                if response.status_code == 200:
                    served_after_s = time.monotonic() - restarted_at
                    break
            except httpx.HTTPError:
                pass
            if second.poll() is not None:
                pytest.fail(f"restarted server exited {second.returncode}: {second.communicate()[1][-3000:]}")
            time.sleep(0.1)
        print(f"served again {served_after_s} s after the restart")
        assert served_after_s is not None and served_after_s <= RESTART_BOUND_S
        outputs = response.json()["outputs"]
        assert np.allclose(np.array(outputs[0]["data"]).reshape(2, 3).sum(axis=1), 1.0)
        assert httpx.get(f"{service.base_url}/v2/models/tiny/ready", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200
        assert httpx.get(f"{service.base_url}/v2/health/ready", timeout=5).status_code == 200
    except BaseException:
        os.killpg(second.pid, signal.SIGKILL)
        raise
    code, stderr = _stop(second, service.stop_timeout_s())
    assert code == 0, stderr[-3000:]
    with sqlite3.connect(service.state_dir / "appliance.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
