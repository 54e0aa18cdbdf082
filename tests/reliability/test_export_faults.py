"""Faults of the export stage and of the disk: kill -9 of `appliance export` at every stage it
announces (and in the middle of publishing), and a disk that fills up under a live server.

After each kill: no partial version is visible (every version folder the repository shows
reads and loads completely), and the rerun publishes. With the disk full: requests are still
served, the export fails with one line and leaves nothing, what was stored is unchanged, the
database passes its integrity check, and request logging resumes once there is space.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from appliance.repository.store import STAGING_DIR, ModelRepository
from appliance.runtime.loading import check_version_files
from tests.helpers.tiny_models import publish_heavy
from tests.reliability.conftest import prepare_state
from tests.reliability.served import ROOT, clean_env

#: Lines `appliance export` prints as it enters each stage; a kill follows each one.
STAGE_MARKERS = [
    "resolve: resolving",
    "export: making",
    "optimise: graph",
    "quantise: making",
    "evaluate: comparing",
    "measure: load",
    "publish: publishing",
]
#: A kill lands this long after its marker, at random (the stage is under way, not starting).
KILL_JITTER_S = (0.0, 0.05)
EXPORT_TIMEOUT_S = 300
VICTIM = "victim"


@pytest.fixture(scope="module")
def source_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = ModelRepository(tmp_path_factory.mktemp("export-source") / "models")
    return publish_heavy(repository, width=512, layers=6).model_path


def _start_export(state: Path, source: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "export", str(source), "--name", VICTIM, "--quant", "int8"],
        cwd=ROOT, env=clean_env(state, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _kill_after_marker(process: subprocess.Popen[str], marker: str, rng: random.Random) -> bool:
    """Read the export's progress until `marker`, then SIGKILL it; False if it ended first."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(marker):
            time.sleep(rng.uniform(*KILL_JITTER_S))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=EXPORT_TIMEOUT_S)
            return True
    process.wait(timeout=EXPORT_TIMEOUT_S)
    return False


def _kill_while_publishing(process: subprocess.Popen[str], state: Path) -> bool:
    """SIGKILL as soon as a manifest appears in a staging folder: publishing has begun."""
    staging = state / "models" / STAGING_DIR
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    drain = threading.Thread(target=lambda: process.stdout and process.stdout.read(), daemon=True)
    drain.start()
    while time.monotonic() < deadline and process.poll() is None:
        if staging.is_dir() and any(staging.glob("*/manifest.json")):
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=EXPORT_TIMEOUT_S)
            return True
        time.sleep(0.0005)
    return False


def _assert_nothing_partial(state: Path) -> list[int]:
    """Every version the repository shows is complete: manifest readable, files checked, the
    graph loads. Returns the visible version numbers."""
    repository = ModelRepository(state / "models")
    if VICTIM not in repository.names():
        return []
    assert repository.broken_versions(VICTIM) == {}
    visible = repository.versions(VICTIM)
    for version in visible:
        check_version_files(version)
        ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    return [version.version for version in visible]


def _rerun(state: Path, source: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "export", str(source), "--name", VICTIM, "--quant", "int8"],
        cwd=ROOT, env=clean_env(state), capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S,
    )


@pytest.mark.reliability
@pytest.mark.parametrize("moment", [*STAGE_MARKERS, "inside publish (manifest staged)"])
def test_kill_9_of_an_export_leaves_no_partial_version_and_the_rerun_publishes(tmp_path: Path, source_onnx: Path, moment: str) -> None:
    state = tmp_path / "state"
    rng = random.Random(moment)
    process = _start_export(state, source_onnx)
    if moment in STAGE_MARKERS:
        killed = _kill_after_marker(process, moment, rng)
    else:
        killed = _kill_while_publishing(process, state)
    visible = _assert_nothing_partial(state)
    print(f"{moment}: killed={killed}, visible versions after the kill: {visible}")
    assert killed or visible == [1], "the export neither got killed nor published"
    rerun = _rerun(state, source_onnx)
    assert rerun.returncode == 0, rerun.stderr
    after = _assert_nothing_partial(state)
    assert after and after[-1] == (visible[-1] + 1 if visible else 1)
    staging = state / "models" / STAGING_DIR
    assert not staging.is_dir() or [p for p in staging.iterdir() if not p.name.endswith(".lock")] == []


def _can_mount_privately() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.reliability
def test_full_disk_under_a_live_server_fails_the_export_cleanly_and_loses_nothing(tmp_path: Path, source_onnx: Path) -> None:
    """A real full filesystem: a 24 MB tmpfs over the state directory in a private mount
    namespace (`unshare -rm`), so the host's filesystems are never touched."""
    if not _can_mount_privately():
        pytest.skip("needs unshare with user and mount namespaces to mount a small tmpfs")
    template = prepare_state(tmp_path / "template" / "state")
    (template.state_dir.parent / "key.txt").write_text(template.key)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, "-m", "tests.reliability.diskfull_driver", str(template.state_dir), str(work), str(source_onnx)],
        cwd=ROOT, env={**clean_env(template.state_dir), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print(json.dumps(result, indent=1))
    assert result["filler_bytes"] > 0
    assert result["statuses_while_full"] == [200], result
    assert result["export_rc"] != 0 and len(result["export_stderr"]) == 1, result["export_stderr"]
    assert "disk full" in result["export_stderr"][0]
    assert "wont-fit" not in result["visible_models_after_export"]
    assert [name for name in result["staging_left"] if not name.endswith(".lock")] == []
    assert result["ready_while_full"] == 200 and result["models_unchanged"] is True
    assert result["statuses_after"] == [200]
    assert result["logged_after"] >= result["logged_before"] + 5, "request logging did not resume"
    assert result["exit_code"] == 0 and result["server_log_tracebacks"] == 0
    assert result["integrity_ok"] is True
    os.sync()
