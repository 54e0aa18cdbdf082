"""`appliance doctor`: one OK/WARN/FAIL line per check, exit 1 only when something FAILs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from appliance.repository.store import ModelRepository
from tests.helpers.tiny_models import publish_adder

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(OK|WARN|FAIL) +[a-zA-Z][\w ]*: .+$")


def _doctor(state_dir: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STATE_DIR=str(state_dir), COLUMNS="400", **env_extra)
    return subprocess.run([sys.executable, "-m", "appliance", "doctor"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_healthy_box_passes_with_one_line_per_check(state_dir: Path) -> None:
    state_dir.chmod(0o700)
    publish_adder(ModelRepository(state_dir / "models"))
    subprocess.run([sys.executable, "-m", "appliance", "db", "upgrade", "--state-dir", str(state_dir)], cwd=ROOT, check=True, capture_output=True)
    result = _doctor(state_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    text = result.stdout
    assert "OK   provider cpu: usable" in text
    assert re.search(r"provider cuda: not usable", text)
    assert "database: schema at" in text and "models: 1 deployable" in text
    assert "api keys: no active API key" in text


def test_auth_off_beyond_loopback_is_a_failure(state_dir: Path) -> None:
    state_dir.chmod(0o700)
    result = _doctor(state_dir, APPLIANCE_HOST="0.0.0.0", APPLIANCE_AUTH="false")
    assert result.returncode == 1
    assert re.search(r"^FAIL bind and auth: auth is off while listening on 0\.0\.0\.0", result.stdout, re.M)
