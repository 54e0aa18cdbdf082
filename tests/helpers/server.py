"""A real uvicorn server on a free loopback port, in a thread, for HTTP tests.

    with running_server(state_dir, batching={"max_queue_size": 4}) as server:
        httpx.get(server.url("/v2/health/ready"), headers=server.auth())

Settings are the appliance's own (keyword overrides, nested ones as dicts); by default an API
key with every scope is created first and exposed as `server.key`. The server waits until
every model has settled (loaded or failed) before the block starts. Reused by the generation
and admin tests.

`serving_process` runs `appliance serve` as a real process instead (for signals and kill -9).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from appliance.app import create_app
from appliance.config import Settings, load_settings
from appliance.errors import ModelNotFound
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.migrate import upgrade

START_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_key(state_dir: Path, name: str, scopes: list[str], **overrides: Any) -> str:
    settings = load_settings(state_dir=state_dir, **overrides)
    database = Database(settings.db_url)
    upgrade(database)
    key, _ = KeyStore(database).create(name, scopes)
    database.close()
    return key


@dataclass
class RunningServer:
    settings: Settings
    app: FastAPI
    server: uvicorn.Server
    key: str | None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def auth(self, key: str | None = None) -> dict[str, str]:
        chosen = key or self.key
        return {"Authorization": f"Bearer {chosen}"} if chosen else {}

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    def state(self, name: str) -> str | None:
        """The model's serving state in lower case ("ready", "evicted", ...), None if unknown."""
        try:
            return self.ctx.models.status(name).state.value.lower()
        except ModelNotFound:
            return None

    def status(self, name: str) -> Any:
        return self.ctx.models.status(name)

    def engine(self, name: str) -> Any:
        """The generation engine serving `name` (the model must be READY)."""
        client = self.ctx.models.loaded_client(name)
        assert client is not None, f"{name} is not loaded"
        return client.engine


@contextmanager
def running_server(
    state_dir: Path,
    *,
    create_keys: dict[str, list[str]] | None = None,
    wait_for_models: bool = True,
    **overrides: Any,
) -> Iterator[RunningServer]:
    """Start the app on a free port; `create_keys` maps key names to scopes (default: one
    key 'test' with infer, admin and metrics)."""
    overrides.setdefault("port", free_port())
    overrides.setdefault("host", "127.0.0.1")
    wanted = {"test": ["infer", "admin", "metrics"]} if create_keys is None else create_keys
    keys = {name: create_key(state_dir, name, scopes) for name, scopes in wanted.items()}
    settings = load_settings(state_dir=state_dir, **overrides)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("test server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("test server did not start")
        time.sleep(0.01)
    if wait_for_models:
        while not app.state.ctx.models.settled():
            if time.monotonic() > deadline:
                raise TimeoutError("models did not settle")
            time.sleep(0.01)
    try:
        yield RunningServer(settings=settings, app=app, server=server, key=next(iter(keys.values()), None), keys=keys)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def process_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without APPLIANCE_* settings, plus the state dir and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


@contextmanager
def serving_process(state_dir: Path, port: int, *, output: Path | None = None, **extra: str) -> Iterator[subprocess.Popen[str]]:
    """`appliance serve` on `port` until ready; killed at the end if still running. `output`:
    a file for its stdout and stderr (else pipes, read by the caller)."""
    sink = output.open("a") if output is not None else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port)],
        cwd=ROOT, env=process_env(state_dir, **extra), text=True,
        stdout=sink or subprocess.PIPE, stderr=sink or subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                told = proc.stderr.read() if proc.stderr else output.read_text() if output else ""
                raise AssertionError(f"server exited early: {told}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if sink is not None:
            sink.close()
