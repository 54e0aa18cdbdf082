"""`appliance admin create-user NAME`: an admin for the web UI, made on the box itself.

The password comes from the first line of stdin when stdin is not a terminal (scripts,
`systemd-ask-password | appliance admin create-user root`), and from two hidden prompts when it
is. It is hashed with argon2id before it touches the database and never echoed or logged. The
database is migrated first, so this works on a fresh state directory.

`appliance admin reset-settings` forgets what was set on the Privacy and Dashboard pages
(logging mode, retention, client networks, cost model), e.g. when a network change locked the
admin out; the configuration file applies again at the next start.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from appliance.cli.app import ConfigOption, StateDirOption, app, console, fail, settings_from
from appliance.errors import ApplianceError
from appliance.store.admin_users import AdminUserStore
from appliance.store.app_settings import AppSettingsStore
from appliance.store.db import Database
from appliance.store.migrate import upgrade

admin_app = typer.Typer(help="Manage the admins of the web UI.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


def _read_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            fail("password: stdin is empty; pipe the password as the first line")
        return line.rstrip("\r\n")
    first = typer.prompt("Password", hide_input=True)
    second = typer.prompt("Password again", hide_input=True)
    if first != second:
        fail("password: the two passwords differ")
    return first


@admin_app.command("create-user")
def create_user(
    name: Annotated[str, typer.Argument(help="The admin's sign-in name.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create an admin for the web UI (password from stdin's first line, or prompted twice)."""
    settings = settings_from(state_dir=state_dir, config=config)
    password = _read_password()
    settings.make_state_dir()
    database = Database(settings.db_url)
    try:
        upgrade(database)
        user = AdminUserStore(database).create(name, password, actor="cli", address="local")
    except ApplianceError as exc:
        fail(str(exc))
    finally:
        database.close()
    console.print(f"created admin {user.name!r}; sign in at /admin", highlight=False)


@admin_app.command("reset-settings")
def reset_settings(state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Forget the settings changed in the web UI; the configuration applies at the next start."""
    settings = settings_from(state_dir=state_dir, config=config)
    database = Database(settings.db_url)
    try:
        upgrade(database)
        keys = AppSettingsStore(database).clear(actor="cli", address="local")
    except ApplianceError as exc:
        fail(str(exc))
    finally:
        database.close()
    console.print(f"removed UI settings: {', '.join(keys) or 'none'}; restart the server to apply", highlight=False)
