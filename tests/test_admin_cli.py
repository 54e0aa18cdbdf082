"""`appliance admin create-user NAME`: the password from stdin's first line when stdin is not a
terminal; a bad name or password is one readable line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import load_settings
from appliance.store.admin_users import AdminUserStore
from appliance.store.audit import AuditLog
from appliance.store.db import Database
from appliance.store.migrate import upgrade
from appliance.store.privacy import PrivacyPolicy

ROOT = Path(__file__).resolve().parents[1]


def _create_user(state_dir: Path, name: str, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "admin", "create-user", name, "--state-dir", str(state_dir)],
        cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_create_user_reads_the_password_from_stdin_and_audits_it(state_dir: Path) -> None:
    done = _create_user(state_dir, "alice", "a long enough password\nignored second line\n")
    assert done.returncode == 0, done.stderr
    assert "created admin 'alice'" in done.stdout
    assert "a long enough password" not in done.stdout + done.stderr
    database = Database(load_settings(state_dir=state_dir).db_url)
    assert AdminUserStore(database).authenticate("alice", "a long enough password") is not None
    (event,) = AuditLog(database).query()
    assert (event.action, event.actor, event.target) == ("admin.user.create", "cli", "alice")
    database.close()


def test_create_user_refuses_bad_input_with_one_line(state_dir: Path) -> None:
    runner = CliRunner()
    cases = [
        ("bob", "short\n", "password: must be at least 12"),
        ("bad name", "a long enough password\n", "name:"),
        ("carol", "", "stdin is empty"),
        ("alice", "a long enough password\n", "already exists"),
    ]
    assert runner.invoke(app, ["admin", "create-user", "alice", "--state-dir", str(state_dir)], input="a long enough password\n").exit_code == 0
    for name, stdin, message in cases:
        done = runner.invoke(app, ["admin", "create-user", name, "--state-dir", str(state_dir)], input=stdin)
        assert done.exit_code != 0, name
        assert message in done.stderr
        assert done.exception is None or isinstance(done.exception, SystemExit)
        assert len(done.stderr.strip().splitlines()) == 1


def test_reset_settings_forgets_what_the_ui_changed(state_dir: Path) -> None:
    settings = load_settings(state_dir=state_dir)
    database = Database(settings.db_url)
    upgrade(database)
    PrivacyPolicy(settings, database).set_networks(["10.0.0.0/8"], ["10.1.0.0/16"], actor="alice", address="10.1.2.3")
    done = CliRunner().invoke(app, ["admin", "reset-settings", "--state-dir", str(state_dir)])
    assert done.exit_code == 0 and "admin_networks" in done.stdout
    assert [str(n) for n in PrivacyPolicy(settings, database).admin_networks] == ["127.0.0.0/8", "::1/128"]
    assert AuditLog(database).query()[0].action == "settings.reset"
    database.close()
