"""Runs inside a private mount namespace (`unshare -rm`): a real full disk under a live server.

    python -m tests.reliability.diskfull_driver TEMPLATE_STATE WORK_DIR SOURCE_ONNX

A small tmpfs is mounted over WORK_DIR/state (visible to this process tree only, gone when it
ends), the template state is copied onto it and `appliance serve` starts there. Then the
filesystem is filled to the last byte and, with the disk full: requests are served (request
logging fails quietly), an `appliance export` fails cleanly with one line, nothing already
stored changes. After the filler is removed, logging resumes. Prints one JSON object with what
it saw; the test decides. Never touches anything outside WORK_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.reliability.served import ROOT, clean_env, integrity_ok, served, table_rows

TMPFS_SIZE = "24m"
REQUESTS_WHILE_FULL = 40
FILL_CHUNK_BYTES = 1 << 20
EXPORT_TIMEOUT_S = 300


def _fill(path: Path) -> int:
    """Write until ENOSPC; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        for size in (FILL_CHUNK_BYTES, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    handle.write(chunk)
                    written += size
                except OSError:
                    break
    return written


def _digests(models: Path) -> dict[str, str]:
    return {
        str(path.relative_to(models)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(models.rglob("*"))
        if path.is_file() and ".staging" not in path.parts and path.name != ".lock"
    }


def main(template: Path, work: Path, source: Path) -> dict[str, object]:
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(state)], check=True)
    shutil.copytree(template, state, dirs_exist_ok=True)
    key = (template.parent / "key.txt").read_text().strip()
    result: dict[str, object] = {}
    body = {"model": "tiny-embed", "input": "the cat sat on the mat"}
    with served(state, key, log_name="diskfull-server.log") as server:
        headers = server.auth()
        assert httpx.post(server.url("/v1/embeddings"), json=body, headers=headers, timeout=30).status_code == 200
        time.sleep(1.5)  # let the request log writer commit that row
        before = _digests(state / "models")
        logged_before = table_rows(state / "appliance.db", "SELECT COUNT(*) FROM request_log")[0][0]
        result["filler_bytes"] = _fill(state / "filler")
        statuses = [httpx.post(server.url("/v1/embeddings"), json=body, headers=headers, timeout=30).status_code for _ in range(REQUESTS_WHILE_FULL)]
        result["statuses_while_full"] = sorted(set(statuses))
        result["requests_while_full"] = len(statuses)
        export = subprocess.run(
            [sys.executable, "-m", "appliance", "export", str(source), "--name", "wont-fit", "--quant", "fp32"],
            cwd=ROOT, env=clean_env(state), capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S,
        )
        result["export_rc"] = export.returncode
        result["export_stderr"] = [line for line in export.stderr.splitlines() if line.strip()]
        result["visible_models_after_export"] = sorted(p.name for p in (state / "models").iterdir() if not p.name.startswith("."))
        staging = state / "models" / ".staging"
        result["staging_left"] = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
        result["ready_while_full"] = httpx.get(server.url("/v2/health/ready"), timeout=30).status_code
        result["models_unchanged"] = _digests(state / "models") == before
        (state / "filler").unlink()
        after_statuses = [httpx.post(server.url("/v1/embeddings"), json=body, headers=headers, timeout=30).status_code for _ in range(5)]
        result["statuses_after"] = sorted(set(after_statuses))
        deadline = time.monotonic() + 30
        logged_after = logged_before
        while time.monotonic() < deadline:
            logged_after = table_rows(state / "appliance.db", "SELECT COUNT(*) FROM request_log")[0][0]
            if logged_after >= logged_before + 5:
                break
            time.sleep(0.2)
        result["logged_before"], result["logged_after"] = logged_before, logged_after
        result["exit_code"] = server.terminate()
        result["server_log_tracebacks"] = server.log_text().count("Traceback")
    result["integrity_ok"] = integrity_ok(state / "appliance.db")
    return result


if __name__ == "__main__":
    outcome = main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print("RESULT " + json.dumps(outcome))
    os.sync()
