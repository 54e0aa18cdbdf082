"""`appliance serve` as a real process: exit 0 after a drained SIGTERM/SIGINT (in-flight work
finishes, new work gets 503), 1 when the drain runs out of time, 2 with one readable line
when it cannot start (port taken, auth off beyond loopback, bad config)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from appliance.repository.store import ModelRepository
from tests.helpers.server import create_key, free_port, process_env as _env, serving_process as serving
from tests.helpers.tiny_models import publish_adder, publish_heavy

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60
DRAIN_TEST_REQUESTS = 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_nothing_in_flight_exits_zero(state_dir: Path, sig: signal.Signals) -> None:
    port = free_port()
    with serving(state_dir, port) as proc:
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0


def test_sigterm_lets_in_flight_work_finish_and_answers_new_work_503(state_dir: Path) -> None:
    # ~1-2 s of work: long enough that the drain is observed while it runs (at 160 layers it
    # took ~0.15 s, a race with the old fixed 0.2 s wait that once reset the late request).
    publish_heavy(ModelRepository(state_dir / "models"), width=1024, layers=1600)
    key = create_key(state_dir, "t", ["infer"])
    port = free_port()
    headers = {"Authorization": f"Bearer {key}"}
    body = {"inputs": [{"name": "X", "shape": [32, 1024], "datatype": "FP32", "data": np.zeros(32 * 1024).tolist()}]}
    with serving(state_dir, port, APPLIANCE_DRAIN_GRACE_S="60") as proc:
        base = f"http://127.0.0.1:{port}"
        results: dict[str, int] = {}
        worker = threading.Thread(
            target=lambda: results.update(first=httpx.post(f"{base}/v2/models/heavy/infer", json=body, headers=headers, timeout=120).status_code)
        )
        worker.start()
        deadline = time.monotonic() + 30
        while "appliance_http_inflight_requests 2.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        while httpx.get(f"{base}/v2/health/ready").status_code != 503:  # the signal is handled
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert worker.is_alive(), "the in-flight request ended before the drain could be seen"
        late = httpx.post(f"{base}/v2/models/heavy/infer", json=body, headers=headers, timeout=30)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        worker.join(timeout=120)
        assert results["first"] == 200
        assert proc.wait(timeout=60) == 0


def test_drain_that_runs_out_of_time_exits_non_zero(state_dir: Path) -> None:
    """Several requests of a full batch (the model's max_batch_size, 32 rows) and ~1-2 s of CPU
    each: they run one after another, so the signal is sent once one waits in the model's queue
    behind a running one, and work is certainly left when the zero grace ends. (With 512-row
    requests every one was refused at once as over the batch limit, and the test only passed
    when the signal landed while a 2.6 MB body was still being parsed.) The server exits at the
    signal, so longer requests cost no test time."""
    publish_heavy(ModelRepository(state_dir / "models"), width=1024, layers=1600)
    key = create_key(state_dir, "t", ["infer"])
    port = free_port()
    rows = 32
    body = {"inputs": [{"name": "X", "shape": [rows, 1024], "datatype": "FP32", "data": np.zeros(rows * 1024).tolist()}]}
    with serving(state_dir, port, APPLIANCE_DRAIN_GRACE_S="0") as proc:
        base = f"http://127.0.0.1:{port}"
        workers = [
            threading.Thread(
                target=lambda: _ignore(
                    lambda: httpx.post(f"{base}/v2/models/heavy/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
                )
            )
            for _ in range(DRAIN_TEST_REQUESTS)
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        # A request waiting in the model's queue behind a running one: work certainly left at
        # the signal. (HTTP requests in flight are a weaker sign: the previous metrics poll may
        # not have left that count yet when the next one reads it.)
        while _pending(base, "heavy") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 1
        for worker in workers:
            worker.join(timeout=120)


def _pending(base: str, model: str) -> float:
    """Requests waiting in `model`'s queue (not counting the one running)."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.split()[-1])
    return 0.0


def _ignore(action: object) -> None:
    try:
        action()  # type: ignore[operator]
    except httpx.HTTPError:
        pass


def _run(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], cwd=ROOT, env=_env(state_dir), capture_output=True, text=True, timeout=120
    )


def test_taken_port_exits_2_with_one_line(state_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        result = _run(state_dir, "serve", "--port", str(holder.getsockname()[1]))
    assert result.returncode == 2
    assert "port is taken" in result.stderr and "Traceback" not in result.stderr


def test_no_auth_beyond_loopback_is_refused(state_dir: Path) -> None:
    result = _run(state_dir, "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--no-auth")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_value_exits_2_naming_the_field(state_dir: Path) -> None:
    result = _run(state_dir, "serve", "--port", "70000")
    assert result.returncode == 2 and "port" in result.stderr and "Traceback" not in result.stderr


def test_no_auth_on_loopback_serves_without_keys(state_dir: Path) -> None:
    publish_adder(ModelRepository(state_dir / "models"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--no-auth"],
        cwd=ROOT, env=_env(state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/models/adder").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
