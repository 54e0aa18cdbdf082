"""`appliance bench` refuses bad input with one readable line and a non-zero exit, before it
sends any load: unreachable server, unknown model, refused key, malformed workload file,
negative rate, public target, contradictory options."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.repository import ModelRepository
from tests.helpers.server import free_port, running_server
from tests.helpers.tiny_models import publish_embedder

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--duration", "0.3", "--max-requests", "4", "--warmup", "1"]


def _bench(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", *args], catch_exceptions=False)


def _one_error_line(result: Any) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_an_unreachable_server_is_one_line(state_dir: Path) -> None:
    line = _one_error_line(_bench("--model", "m", "--url", f"http://127.0.0.1:{free_port()}", *QUICK))
    assert "unreachable" in line


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return None


def test_a_server_that_is_not_an_appliance_is_one_line(state_dir: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        line = _one_error_line(_bench("--model", "m", "--url", f"http://127.0.0.1:{server.server_address[1]}", *QUICK))
    finally:
        server.shutdown()
        thread.join()
    assert "is not live" in line


def test_an_unknown_model_a_missing_key_and_a_wrong_workload_are_one_line_each(state_dir: Path) -> None:
    publish_embedder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server:
        unknown = _bench("--model", "nope", "--workload", "embeddings", "--url", server.base_url, "--api-key", server.key or "", *QUICK)
        assert "model 'nope' is not served" in _one_error_line(unknown)
        assert "tiny-embed" in unknown.stderr
        keyless = _bench("--model", "tiny-embed", "--workload", "embeddings", "--url", server.base_url, "--api-key", "wrong", *QUICK)
        assert "401" in _one_error_line(keyless)
        unknown_v2 = _bench("--model", "nope", "--workload", "infer", "--url", server.base_url, "--api-key", server.key or "", *QUICK)
        assert "does not exist" in _one_error_line(unknown_v2)
        wrong_kind = _bench("--model", "tiny-embed", "--workload", "chat", "--url", server.base_url, "--api-key", server.key or "", *QUICK)
        assert "every request to 'tiny-embed' failed" in _one_error_line(wrong_kind)


def test_a_malformed_workload_file_is_named_with_its_line(state_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "x", "max_tokens": -3}\n')
    # checked before any connection: the dead URL is never reached
    line = _one_error_line(_bench("--model", "m", "--prompts", str(path), "--url", f"http://127.0.0.1:{free_port()}"))
    assert "prompts.jsonl:2" in line and "max_tokens" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rate", "-2"], "rate: must be a positive number"),
        (["--rate", "fast"], "rate: 'fast' is not a number"),
        (["--concurrency", "1", "--rate", "2"], "not both"),
        (["--concurrency", "0"], "concurrency"),
        (["--duration", "-1"], "duration"),
        (["--max-requests", "0"], "max-requests"),
        (["--max-requests", "1000001"], "max-requests"),
        (["--max-tokens", "9:3"], "max-tokens"),
        (["--workload", "video"], "workload"),
        (["--url", "http://8.8.8.8:8000"], "--allow-remote"),
    ],
)
def test_bad_options_are_refused_before_any_load(state_dir: Path, args: list[str], expected: str) -> None:
    assert expected in _one_error_line(_bench("--model", "m", *args))


def test_model_and_compare_are_exclusive_and_one_is_needed(state_dir: Path) -> None:
    assert "not both or neither" in _one_error_line(_bench())
    assert "not both or neither" in _one_error_line(_bench("--model", "a", "--compare", "a"))
    assert "does not take --url" in _one_error_line(_bench("--compare", "a", "--url", "http://127.0.0.1:1"))


def test_compare_of_a_model_not_in_the_repository_is_one_line(state_dir: Path) -> None:
    line = _one_error_line(_bench("--compare", "ghost", *QUICK))
    assert "'ghost' is not in the repository" in line


def test_the_real_command_prints_one_line_and_no_traceback(state_dir: Path) -> None:
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(state_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "bench", "--model", "m", "--rate", "-1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: rate: must be a positive number of requests/s up to 10000, got -1"]
