"""`appliance keys create | update | list | revoke`: API keys in the appliance database.

The key is printed once, at creation (`--quiet`: the key alone on stdout, for scripts); only
its SHA-256 is stored. `--group` puts a key in a team whose usage and cost are summed
(`appliance usage`, the admin Usage page). The database is migrated first, so these work on a
fresh state dir.
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

keys_app = typer.Typer(help="Create, update, list and revoke API keys.", no_args_is_help=True)
GroupOption = Annotated[
    str | None,
    typer.Option("--group", help="Team the key's usage and cost count toward (letters, digits, . _ -); '' for none."),
]
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
    group: GroupOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print it once."""
    try:
        key, info = _store(state_dir, config).create(name, scope or ["infer"], expires_days=expires, group=group)
    except ApplianceError as exc:
        fail(str(exc))
    if quiet:
        typer.echo(key)
        return
    expiry = info.expires_at.isoformat() if info.expires_at else "never"
    in_group = f", group: {info.group}" if info.group else ""
    console.print(f"created key {info.name!r} (scopes: {' '.join(info.scopes)}, expires: {expiry}{in_group})", highlight=False)
    console.print("store it now, it is not shown again:", highlight=False)
    typer.echo(key)


@keys_app.command("update")
def update(
    name: Annotated[str, typer.Argument(help="Name of the key to change.")],
    group: GroupOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Change a key's settings; its secret stays the same. Usage counted from now on goes to the
    new group, what was counted before stays with the old one."""
    if group is None:
        fail("nothing to update: give --group TEAM (or --group '' to take the key out of its group)", code=2)
    try:
        info = _store(state_dir, config).set_group(name, group)
    except ApplianceError as exc:
        fail(str(exc))
    console.print(f"key {info.name!r} is now in group {info.group!r}" if info.group else f"key {info.name!r} is in no group", highlight=False)


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
            f"group {info.group or '-':<16} "
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
