"""`appliance usage [--key K] [--group G] [--since DATE] [--until DATE] [--json|--csv]`: usage
and cost per API key and model version, read from the appliance database.

Composition root for the usage report (appliance.store.usage_report): it reads the counts the
servers flushed (at most a few seconds old), prices them with `appliance bench`'s measured
throughputs under `<state dir>/bench` and the cost model (the dashboard's saved values over
the configuration), and prints a table, JSON or CSV. Bad input is one line on stderr and exit
code 2. Reads numbers only: the database holds no text for usage.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from appliance.benchmark.results import BENCH_DIR
from appliance.cli.app import ConfigOption, StateDirOption, app, console, fail, settings_from
from appliance.errors import ApplianceError, InvalidInput, NotFound
from appliance.repository.store import ModelRepository
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.migrate import upgrade
from appliance.store.privacy import PrivacyPolicy
from appliance.store.usage_pricing import PriceList
from appliance.store.usage_queries import UsageFilter, parse_time
from appliance.store.usage_report import UsageCounts, UsageReport, build_report, format_cost

#: The period when --since is not given.
DEFAULT_SINCE = "30d"
#: Exit code for input the command cannot use (a bad date, an unknown key, --json with --csv).
EXIT_BAD_INPUT = 2
#: Characters per line of the table when stdout is not a terminal.
PIPED_TABLE_WIDTH = 200


def _cost(value: float | None, currency: str, unpriced: int = 0) -> str:
    return format_cost(value, currency) + (f" (+{unpriced} unpriced)" if value is not None and unpriced else "")


def _counts(row: UsageCounts) -> list[str]:
    return [
        str(row.requests), f"{row.errors_4xx}/{row.errors_5xx}", str(row.prompt_tokens),
        str(row.completion_tokens), str(row.embedding_inputs), str(row.rerank_documents),
    ]


def _table(report: UsageReport) -> Table:
    table = Table(title=f"usage {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC", title_justify="left")
    for column in ("key", "group", "model", "version", "requests", "errors 4xx/5xx", "prompt tok", "completion tok", "emb inputs", "rerank docs", "cost"):
        table.add_column(column, justify="left" if column in ("key", "group", "model", "version") else "right")
    for line in report.lines:
        version = f"{line.version} {line.variant}" if line.variant else line.version or "-"
        table.add_row(line.key, line.group or "-", line.model, version, *_counts(line), _cost(line.cost, report.currency))
    total = report.total()
    table.add_row("total", "", "", "", *_counts(total), _cost(total.cost, report.currency, total.unpriced_lines), style="bold")
    return table


@app.command("usage")
def usage(
    key: Annotated[str | None, typer.Option("--key", help="Only this API key (its name or its id, the public prefix).")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Only keys of this group.")] = None,
    since: Annotated[str, typer.Option("--since", help="Start: YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or a span back such as 7d, 12h.")] = DEFAULT_SINCE,
    until: Annotated[str | None, typer.Option("--until", help="End (same forms; a plain date includes that day). Default: now.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON for scripts.")] = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print the report as CSV (one line per key and model version).")] = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Usage and cost per API key and model: requests, errors, tokens, embedding inputs, rerank
    documents, and what they cost on this box (from `appliance bench` figures)."""
    if json_output and csv_output:
        fail("--json and --csv: choose one output format", code=EXIT_BAD_INPUT)
    settings = settings_from(state_dir=state_dir, config=config)
    now = datetime.now(UTC)
    try:
        where_since = parse_time(since, "since", now=now)
        where_until = parse_time(until, "until", now=now, end=True) if until else now
        settings.make_state_dir()
        database = Database(settings.db_url)
        upgrade(database)
        key_id = KeyStore(database).find(key).prefix if key else None
        where = UsageFilter(where_since, where_until, key_id=key_id, group=group or None)
        prices = PriceList.from_bench_dir(settings.state_dir / BENCH_DIR, PrivacyPolicy(settings, database).cost)
        variants = {(v.name, str(v.version)): v.variant for v in ModelRepository(settings.models_dir).all_versions()}
        report = build_report(database, where, prices, variants)
        database.close()
    except (InvalidInput, NotFound) as exc:
        fail(str(exc), code=EXIT_BAD_INPUT)
    except ApplianceError as exc:
        fail(str(exc))
    if json_output:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        return
    if csv_output:
        sys.stdout.write(report.to_csv())
        return
    if not report.lines:
        console.print(f"no usage from {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC", highlight=False)
        return
    table_console = console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)
    table_console.print(_table(report))
    for model, why in report.unpriced().items():
        console.print(f"no cost for {model}: {why}", highlight=False)
