"""`appliance keys create | update | list | revoke | groups | group-limits`: API keys and key
groups in the appliance database.

The key is printed once, at creation (`--quiet`: the key alone on stdout, for scripts); only
its SHA-256 is stored. `--group` puts a key in a team whose usage and cost are summed
(`appliance usage`, the admin Usage page). `--rpm`, `--tpm`, `--tokens-per-day`, `--tokens-per-month` limit a key
(429 with Retry-After and OpenAI's x-ratelimit-* headers beyond; 0 removes a limit);
`--priority batch` lets a key's work wait behind interactive work (docs/USAGE.md).
`group-limits GROUP` gives a group limits of its own, shared by all its keys on top of each
key's (audited, as the admin Keys page's changes are); `groups` lists groups. The database is
migrated first, so these work on a fresh state dir.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from appliance.cli.app import (
    CLI_ACTOR,
    CLI_ADDRESS,
    ConfigOption,
    JsonOption,
    StateDirOption,
    app,
    console,
    fail,
    settings_from,
)
from appliance.errors import ApplianceError
from appliance.store.db import Database
from appliance.store.key_groups import GroupInfo, GroupStore
from appliance.store.keys import SCOPES, KeyStore, check_priority
from appliance.store.rate_limits import RateLimits, checked_limit
from appliance.store.migrate import upgrade

keys_app = typer.Typer(help="Create, update, list and revoke API keys; limits of key groups.", no_args_is_help=True)
GroupOption = Annotated[
    str | None,
    typer.Option("--group", help="Team the key's usage and cost count toward (letters, digits, . _ -); '' for none."),
]
RpmOption = Annotated[int | None, typer.Option("--rpm", help="Requests per minute (0: no limit).")]
TpmOption = Annotated[int | None, typer.Option("--tpm", help="Prompt + completion tokens per minute (0: no limit).")]
TokensPerDayOption = Annotated[int | None, typer.Option("--tokens-per-day", help="Tokens per day (0: no limit).")]
TokensPerMonthOption = Annotated[
    int | None, typer.Option("--tokens-per-month", help="Tokens per calendar month, UTC (0: no limit).")
]
PriorityOption = Annotated[
    str | None,
    typer.Option("--priority", help="interactive (default) or batch: batch work is admitted after interactive work."),
]
app.add_typer(keys_app, name="keys")


def _limits_text(limits: RateLimits) -> str:
    parts = [
        f"{value} {unit}"
        for value, unit in (
            (limits.rpm, "requests/min"), (limits.tpm, "tokens/min"), (limits.tokens_per_day, "tokens/day"),
            (limits.tokens_per_month, "tokens/month"),
        )
        if value is not None
    ]
    return ", ".join(parts) or "no limits"


def _database(state_dir: object, config: object) -> Database:
    settings = settings_from(state_dir=state_dir, config=config)
    settings.make_state_dir()
    database = Database(settings.db_url)
    upgrade(database)
    return database


def _store(state_dir: object, config: object) -> KeyStore:
    return KeyStore(_database(state_dir, config))


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name to recognise the key by (unique).")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help=f"Scope, repeatable: {', '.join(SCOPES)}. Default: infer.")
    ] = None,
    expires: Annotated[float | None, typer.Option("--expires", help="Days until the key expires.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the key.")] = False,
    group: GroupOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    tokens_per_day: TokensPerDayOption = None,
    tokens_per_month: TokensPerMonthOption = None,
    priority: PriorityOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print it once."""
    limits = RateLimits(rpm=rpm, tpm=tpm, tokens_per_day=tokens_per_day, tokens_per_month=tokens_per_month)
    try:
        key, info = _store(state_dir, config).create(
            name, scope or ["infer"], expires_days=expires, group=group, limits=limits, priority=priority or "interactive"
        )
    except ApplianceError as exc:
        fail(str(exc))
    if quiet:
        typer.echo(key)
        return
    expiry = info.expires_at.isoformat() if info.expires_at else "never"
    in_group = f", group: {info.group}" if info.group else ""
    console.print(
        f"created key {info.name!r} (scopes: {' '.join(info.scopes)}, expires: {expiry}{in_group}, {_limits_text(info.limits)})",
        highlight=False,
    )
    console.print("store it now, it is not shown again:", highlight=False)
    typer.echo(key)


@keys_app.command("update")
def update(
    name: Annotated[str, typer.Argument(help="Name of the key to change.")],
    group: GroupOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    tokens_per_day: TokensPerDayOption = None,
    tokens_per_month: TokensPerMonthOption = None,
    priority: PriorityOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Change a key's group, limits or priority; its secret stays the same. Usage counted from
    now on goes to the new group, what was counted before stays with the old one; running
    servers apply new limits and priorities within seconds."""
    limits = {"rpm": rpm, "tpm": tpm, "tokens-per-day": tokens_per_day, "tokens-per-month": tokens_per_month}
    if group is None and priority is None and all(value is None for value in limits.values()):
        fail(
            "nothing to update: give --group TEAM, --rpm N, --tpm N, --tokens-per-day N, --tokens-per-month N or --priority P",
            code=2,
        )
    store = _store(state_dir, config)
    try:
        for flag, value in limits.items():
            checked_limit(value, flag)  # refuse a bad value before anything is written
        if priority is not None:
            check_priority(priority)
        info = store.set_group(name, group) if group is not None else store.find(name)
        if any(value is not None for value in limits.values()):
            info = store.set_limits(name, rpm=rpm, tpm=tpm, tokens_per_day=tokens_per_day, tokens_per_month=tokens_per_month)
        if priority is not None:
            info = store.set_priority(name, priority)
    except ApplianceError as exc:
        fail(str(exc))
    in_group = f"in group {info.group!r}" if info.group else "in no group"
    console.print(f"key {info.name!r} is {in_group}, {_limits_text(info.limits)}, priority {info.priority}", highlight=False)


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
            f"group {info.group or '-':<16} {_limits_text(info.limits):<28} "
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


def _group_text(group: GroupInfo) -> str:
    members = f"{group.keys} key{'s' if group.keys != 1 else ''} ({group.active_keys} active)"
    return f"group {group.name!r}: {members}, {_limits_text(group.limits)}"


@keys_app.command("group-limits")
def group_limits(
    group: Annotated[str, typer.Argument(help="The group (letters, digits, . _ -), with or without keys yet.")],
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    tokens_per_day: TokensPerDayOption = None,
    tokens_per_month: TokensPerMonthOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Set a group's own limits, shared by all its keys: a request runs only if both its key's
    and its group's limits allow it. Options not given stay as they are; 0 removes a limit;
    no option at all shows the group. Running servers apply changes within seconds."""
    limits = {"rpm": rpm, "tpm": tpm, "tokens_per_day": tokens_per_day, "tokens_per_month": tokens_per_month}
    store = GroupStore(_database(state_dir, config))
    try:
        if all(value is None for value in limits.values()):
            info = store.get(group)
        else:
            info = store.set_limits(group, **limits, actor=CLI_ACTOR, address=CLI_ADDRESS)
    except ApplianceError as exc:
        fail(str(exc))
    console.print(_group_text(info), highlight=False)
    if info.keys == 0:
        console.print(
            f"note: no key is in group {info.name!r} yet (appliance keys update NAME --group {info.name})", highlight=False
        )


@keys_app.command("groups")
def list_groups(json_output: JsonOption = False, state_dir: StateDirOption = None, config: ConfigOption = None) -> None:
    """List key groups: how many keys each has and its own limits."""
    groups = GroupStore(_database(state_dir, config)).list()
    if json_output:
        typer.echo(json.dumps([group.as_json() for group in groups], indent=2))
        return
    if not groups:
        console.print("no key groups; put a key in one with `appliance keys update NAME --group TEAM`", highlight=False)
        return
    for group in groups:
        console.print(
            f"{group.name:<24} {group.keys:>4} keys  {group.active_keys:>4} active  {_limits_text(group.limits)}", highlight=False
        )
