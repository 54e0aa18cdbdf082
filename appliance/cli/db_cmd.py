"""`appliance db upgrade`: migrate the appliance database to the newest schema (the server
also does this at start). Never downgrades."""

from __future__ import annotations

import typer

from appliance.cli.app import ConfigOption, StateDirOption, app, console, fail, settings_from
from appliance.errors import ApplianceError
from appliance.store.db import Database
from appliance.store.migrate import current_revision, upgrade

db_app = typer.Typer(help="The appliance database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """Apply every pending migration."""
    settings = settings_from(state_dir=state_dir, config=config)
    settings.make_state_dir()
    try:
        database = Database(settings.db_url)
        before = current_revision(database)
        after = upgrade(database)
    except ApplianceError as exc:
        fail(str(exc))
    if before == after:
        console.print(f"database already at {after}", highlight=False)
    else:
        console.print(f"database upgraded {before or '(empty)'} -> {after}", highlight=False)
    database.close()
