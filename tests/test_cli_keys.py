"""`appliance keys create | list | revoke` and `appliance db upgrade` on a fresh state dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.store.db import Database
from appliance.store.keys import KEY_PATTERN, KeyStore

ROOT = Path(__file__).resolve().parents[1]


def _run(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_STATE_DIR"] = str(state_dir)
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_db_upgrade_migrates_a_fresh_state_dir_and_is_idempotent(state_dir: Path) -> None:
    first = _run(state_dir, "db", "upgrade")
    assert first.returncode == 0 and "upgraded" in first.stdout
    again = _run(state_dir, "db", "upgrade")
    assert again.returncode == 0 and "already at" in again.stdout


def test_keys_create_quiet_prints_only_a_working_key(state_dir: Path) -> None:
    created = _run(state_dir, "keys", "create", "ci", "--scope", "infer", "--scope", "metrics", "--expires", "30", "--quiet")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert KEY_PATTERN.fullmatch(key) and "\n" not in key
    info = KeyStore(Database(f"sqlite:///{state_dir / 'appliance.db'}")).verify(key)
    assert info.scopes == ("infer", "metrics") and info.expires_at is not None


def test_keys_list_json_never_shows_secrets_and_revoke_stops_the_key(state_dir: Path) -> None:
    key = _run(state_dir, "keys", "create", "ops", "--quiet").stdout.strip()
    listed = json.loads(_run(state_dir, "keys", "list", "--json").stdout)
    assert [(k["name"], k["scopes"], k["state"]) for k in listed] == [("ops", ["infer"], "active")]
    assert key.split("_")[-1] not in json.dumps(listed)
    assert _run(state_dir, "keys", "revoke", "ops").returncode == 0
    assert json.loads(_run(state_dir, "keys", "list", "--json").stdout)[0]["state"] == "revoked"


def test_bad_key_commands_exit_non_zero_with_one_line(state_dir: Path) -> None:
    bad_scope = _run(state_dir, "keys", "create", "x", "--scope", "root")
    assert bad_scope.returncode != 0 and "unknown scope 'root'" in bad_scope.stderr and "Traceback" not in bad_scope.stderr
    _run(state_dir, "keys", "create", "dup", "--quiet")
    duplicate = _run(state_dir, "keys", "create", "dup")
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    missing = _run(state_dir, "keys", "revoke", "ghost")
    assert missing.returncode != 0 and "no key named 'ghost'" in missing.stderr
