"""`appliance up`: the quickstart exports what is missing in a child process, then serves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from appliance.repository import ModelRepository
from tests.helpers.server import free_port

#: Exporting MiniLM on 2 cores takes about a minute; the server then loads both models.
UP_TIMEOUT_S = 600.0


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's native library mapped (i.e. imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_up_exports_a_missing_default_in_a_child_and_serves_without_torch(
    exported_smollm2: ModelRepository, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    # The LLM is already there; the embedding model is missing and must be exported.
    shutil.copytree(exported_smollm2.root, state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    port = free_port()
    env = {**os.environ, "APPLIANCE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "appliance", "up", "--port", str(port), "--state-dir", str(state), "--no-auth", "--host", "127.0.0.1"]
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and process.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(1)
        assert ready, log.read_text()[-2000:]
        names = {model["id"] for model in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]}
        assert {"all-minilm-l6-v2", "smollm2-135m-instruct"} <= names
        assert not _maps_torch(process.pid), "the serving process loaded torch"
        text = log.read_text()
        assert "model all-minilm-l6-v2 version 1 ready to serve" in text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
