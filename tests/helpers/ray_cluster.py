"""A two-node Ray cluster on loopback for the scale-out tests: `ray start --head` and a second
`ray start --address=...` worker node, each with its own CPU count, both `--block` child
processes of the test (stopping them stops every process they started), in a temp dir of
their own. Token authentication with a token made for the cluster, no usage reporting, no
dashboard. Only tests import this module."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server import free_port

NODE_START_TIMEOUT_S = 90.0
NODE_STOP_TIMEOUT_S = 30.0
STARTED = "Ray runtime started"


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    #: The environment a driver (`appliance serve --ray`) needs to join: the auth token.
    env: dict[str, str]
    nodes: list[subprocess.Popen[str]]
    #: What only the worker node's environment has (its processes, replicas included, inherit it).
    worker_env: dict[str, str]

    def logs(self) -> list[Path]:
        """Every log file the cluster's processes wrote (replicas included)."""
        return [path for path in self.temp_dir.rglob("*") if path.is_file() and path.parent.name == "logs"]


def _ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *args]


def _wait_started(node: subprocess.Popen[str], output: Path, what: str) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while STARTED not in output.read_text(errors="replace"):
        if node.poll() is not None:
            raise NodeDidNotStart(
                f"ray {what} exited with {node.returncode}: {output.read_text(errors='replace')[-2000:]}\n{_diagnostics(output.parent)}"
            )
        if time.monotonic() > deadline:
            raise NodeDidNotStart(
                f"ray {what} did not start in {NODE_START_TIMEOUT_S:g} s: {output.read_text(errors='replace')[-2000:]}\n"
                f"{_diagnostics(output.parent)}"
            )
        time.sleep(0.2)


def _stop(node: subprocess.Popen[str]) -> None:
    if node.poll() is not None:
        return
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=NODE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)  # the node's own process group (start_new_session)
        node.wait(timeout=10)


def _diagnostics(temp_dir: Path) -> str:
    """The tails of the head's output and the GCS log, for a node that did not start."""
    parts = []
    for path in [temp_dir / "head.out", *sorted(temp_dir.glob("session_*/logs/gcs_server.*"))]:
        if path.is_file():
            parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


class NodeDidNotStart(RuntimeError):
    pass


@contextmanager
def ray_cluster(
    *, head_cpus: int, worker_cpus: int, env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None
) -> Iterator[RayCluster]:
    """The cluster, stopped at the end; one more try when a node does not start (a busy
    machine once kept the worker from reaching the head's GCS for a minute). `env` goes to
    both nodes, `worker_env` to the worker node only."""
    try:
        cluster = _start(head_cpus=head_cpus, worker_cpus=worker_cpus, env=env, worker_env=worker_env or {})
    except NodeDidNotStart:
        cluster = _start(head_cpus=head_cpus, worker_cpus=worker_cpus, env=env, worker_env=worker_env or {})
    try:
        yield cluster
    finally:
        _stop_all(cluster.nodes, cluster.temp_dir)


def _stop_all(nodes: list[subprocess.Popen[str]], temp_dir: Path) -> None:
    for node in reversed(nodes):
        _stop(node)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start(*, head_cpus: int, worker_cpus: int, env: dict[str, str] | None, worker_env: dict[str, str]) -> RayCluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    token = uuid.uuid4().hex
    cluster_env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Stop at once when the test ends (no 30 s drain of the node).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        **(env or {}),
    }
    process_env = {**os.environ, **cluster_env}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
    nodes: list[subprocess.Popen[str]] = []
    try:
        head_log = temp_dir / "head.out"
        head = subprocess.Popen(
            _ray(
                "--head", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", *common,
            ),
            stdout=head_log.open("w"), stderr=subprocess.STDOUT, env=process_env, text=True, start_new_session=True,
        )
        nodes.append(head)
        _wait_started(head, head_log, "head node")
        worker_log = temp_dir / "worker.out"
        worker = subprocess.Popen(
            _ray(f"--address={address}", f"--num-cpus={worker_cpus}", f"--dashboard-agent-listen-port={free_port()}", *common),
            stdout=worker_log.open("w"), stderr=subprocess.STDOUT, env={**process_env, **worker_env}, text=True, start_new_session=True,
        )
        nodes.append(worker)
        _wait_started(worker, worker_log, "worker node")
    except BaseException:
        _stop_all(nodes, temp_dir)
        raise
    return RayCluster(address=address, temp_dir=temp_dir, env=cluster_env, nodes=nodes, worker_env=worker_env)
