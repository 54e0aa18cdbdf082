"""`appliance keys create | list | revoke`: API keys in the appliance database.

The key is printed once, at creation (`--quiet`: the key alone on stdout, for scripts); only
its SHA-256 is stored. The database is migrated first, so these work on a fresh state dir.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from appliance.cli.app import ConfigOption, JsonOption, StateDirOption, app, console, fail, settings_from
from appliance.errors import ApplianceError
from appliance.store.db import Database
from appliance.store.keys import SCOPES, KeyStore
from appliance.store.migrate import upgrade

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _store(state_dir: object, config: object) -> KeyStore:
    settings = settings_from(state_dir=state_dir, config=config)
    settings.make_state_dir()
    database = Database(settings.db_url)
    upgrade(database)
    return KeyStore(database)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name to recognise the key by (unique).")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help=f"Scope, repeatable: {', '.join(SCOPES)}. Default: infer.")
    ] = None,
    expires: Annotated[float | None, typer.Option("--expires", help="Days until the key expires.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the key.")] = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print it once."""
    try:
        key, info = _store(state_dir, config).create(name, scope or ["infer"], expires_days=expires)
    except ApplianceError as exc:
        fail(str(exc))
    if quiet:
        typer.echo(key)
        return
    expiry = info.expires_at.isoformat() if info.expires_at else "never"
    console.print(f"created key {info.name!r} (scopes: {' '.join(info.scopes)}, expires: {expiry})", highlight=False)
    console.print("store it now, it is not shown again:", highlight=False)
    typer.echo(key)


@keys_app.command("list")
def list_keys(json_output: JsonOption = False, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """List keys (never the secrets)."""
    infos = _store(state_dir, config).list()
    if json_output:
        typer.echo(json.dumps([info.as_json() for info in infos], indent=2))
        return
    if not infos:
        console.print("no API keys; create one with `appliance keys create NAME`", highlight=False)
        return
    for info in infos:
        data = info.as_json()
        console.print(
            f"{info.name:<24} apl_{info.prefix}_…  {' '.join(info.scopes):<20} {data['state']:<8} "
            f"expires {data['expires_at'] or 'never'}  last used {data['last_used_at'] or 'never'}",
            highlight=False,
        )


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="Name of the key to revoke.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke a key: it stops working at once (running servers: within seconds)."""
    try:
        info = _store(state_dir, config).revoke(name)
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"revoked key {info.name!r}", highlight=False)
