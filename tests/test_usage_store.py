"""Usage accounting in the store, on real SQLite files (and PostgreSQL where installed): counts
add up per minute, key, group, model and version; minute rows roll up into hours after a day
and hours into days after a month without changing any total; two processes flushing and
rolling up into one database lose and double nothing; `appliance bench` figures price the
usage; the report sums per key, group and model and writes CSV; migration 0004 goes up and down;
keys get their group from `appliance keys create|update --group`."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import threading
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from click.testing import Result
from sqlalchemy import func, inspect, select
from typer.testing import CliRunner

from appliance.benchmark.results import BenchResult, PointResult, VariantResult, write_result
from appliance.cli import app as cli_app
from appliance.cli.bench_cmd import RUNS_DIR
from appliance.config import CostSettings
from appliance.errors import ConfigError, InvalidInput
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.migrate import alembic_config, head_revision, upgrade
from appliance.store.usage_pricing import PriceList
from appliance.store.usage_queries import UsageFilter, parse_time, usage_totals
from appliance.store.usage_recorder import UsageRecorder
from appliance.store.usage_report import CSV_COLUMNS, ERRORS_ONLY_BASIS, build_report
from appliance.store.usage_rollup import roll_up
from appliance.store.usage_tables import COUNTER_COLUMNS, DAY_S, HOUR_S, IDENTITY_COLUMNS, MINUTE_S, UsageCount
from appliance.store.upsert import check_dialect
from appliance.store.usage_writes import Counters, UsageIdentity
from tests.helpers.postgres import postgres_url  # noqa: F401 - fixture
from tests.helpers.usage import COMPLETION_TOKENS, PROMPT_TOKENS, event, flush_rounds

NOW = datetime(2026, 12, 10, 12, 30, 15, tzinfo=UTC)
EVERYTHING = UsageFilter(NOW - timedelta(days=3650), NOW + timedelta(days=1))
#: A box that costs exactly 3.6 per hour: 1 unit/s then costs 1.0 per 1k units.
ROUND_COST = CostSettings(hardware_price=0.0, power_watts=1000.0, electricity_price_kwh=3.6, currency="EUR")


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'appliance.db'}")
    upgrade(db)
    yield db
    db.close()


def _rows(database: Database) -> list[UsageCount]:
    with database.session() as session:
        return list(session.scalars(select(UsageCount).order_by(UsageCount.bucket_s, UsageCount.bucket_start, UsageCount.key_id)))


def _sum(database: Database) -> Counters:
    total = Counters()
    for row in usage_totals(database, EVERYTHING):
        total.add(row.counters)
    return total


def test_the_code_lists_the_tables_counters_and_identity() -> None:
    assert tuple(field.name for field in fields(Counters)) == COUNTER_COLUMNS
    assert tuple(field.name for field in fields(UsageIdentity)) == IDENTITY_COLUMNS


def test_counts_add_up_per_minute_key_and_model_and_follow_the_keys_group(database: Database) -> None:
    keys = KeyStore(database)
    _, alice = keys.create("alice", group="team-a")
    _, bob = keys.create("bob")
    recorder = UsageRecorder(database)
    recorder.add(event(NOW, alice.prefix, prompt_tokens=10, completion_tokens=4))
    recorder.add(event(NOW + timedelta(seconds=30), alice.prefix, prompt_tokens=6, completion_tokens=2))
    recorder.add(event(NOW + timedelta(seconds=50), alice.prefix, status=404))
    recorder.add(event(NOW, bob.prefix, model="embed", embedding_inputs=3, prompt_tokens=9))
    recorder.add(event(NOW, bob.prefix, model="embed", status=503))
    assert _rows(database) == []  # nothing is written on the request path
    assert recorder.flush() == 3  # alice's minute 12:30 and 12:31, bob's minute
    keys.set_group("alice", "team-b")
    recorder.add(event(NOW, alice.prefix, prompt_tokens=1))
    recorder.flush()
    totals = {(t.key_id, t.key_group, t.model): t.counters for t in usage_totals(database, EVERYTHING)}
    assert totals[(alice.prefix, "team-a", "m")] == Counters(requests=3, errors_4xx=1, prompt_tokens=16, completion_tokens=6)
    assert totals[(alice.prefix, "team-b", "m")] == Counters(requests=1, prompt_tokens=1)
    assert totals[(bob.prefix, "", "embed")] == Counters(requests=2, errors_5xx=1, prompt_tokens=9, embedding_inputs=3)
    assert {row.bucket_start.minute for row in _rows(database) if row.key_id == alice.prefix} == {30, 31}
    assert all(row.bucket_s == MINUTE_S and row.bucket_start.second == 0 for row in _rows(database))


def test_minute_rows_roll_up_into_hours_after_a_day_and_hours_into_days_after_a_month(database: Database) -> None:
    recorder = UsageRecorder(database)
    times = {
        "recent": [NOW - timedelta(hours=2, minutes=m) for m in range(3)],  # stays in minutes
        "days ago": [NOW - timedelta(days=3, minutes=m) for m in range(0, 120, 7)],  # 12:30 back to 10:31
        "weeks ago": [NOW - timedelta(days=20, hours=h) for h in range(5)],
        "months ago": [NOW - timedelta(days=45, hours=h) for h in range(0, 30, 3)],  # two days
    }
    for when in (t for group in times.values() for t in group):
        recorder.add(event(when, prompt_tokens=2, completion_tokens=1))
    recorder.flush()
    before = _sum(database)
    minute_rows = len(_rows(database))

    rolled = roll_up(database, NOW)
    assert rolled[MINUTE_S] == minute_rows - len(times["recent"])
    assert _sum(database) == before
    lengths = [row.bucket_s for row in _rows(database)]
    assert lengths.count(MINUTE_S) == 3
    assert lengths.count(HOUR_S) == 3 + 5  # three days ago: 10:xx to 12:xx; twenty days ago: five hours
    assert lengths.count(DAY_S) == 2  # 45 days ago, 12:30 back 27 hours: two days
    day_rows = [row for row in _rows(database) if row.bucket_s == DAY_S]
    assert all(row.bucket_start.hour == 0 and row.bucket_start < NOW - timedelta(days=30) for row in day_rows)
    assert sum(row.requests for row in day_rows) == len(times["months ago"])
    # Idempotent, and a late row for an hour already rolled up is added to it next time.
    assert roll_up(database, NOW) == {MINUTE_S: 0, HOUR_S: 0}
    recorder.add(event(NOW - timedelta(days=3), prompt_tokens=100))
    recorder.flush()
    roll_up(database, NOW)
    assert _sum(database).prompt_tokens == before.prompt_tokens + 100
    assert [row.bucket_s for row in _rows(database)].count(HOUR_S) == 8
    # A period older than a day is counted in whole hours: the hour rows answer it.
    noon = (NOW - timedelta(days=3)).replace(minute=0, second=0)
    hour = UsageFilter(noon, noon + timedelta(hours=1))
    assert sum(t.counters.requests for t in usage_totals(database, hour)) == 5 + 1  # 12:02 to 12:30, and the late one


def test_two_processes_flushing_and_rolling_up_into_one_sqlite_database_lose_and_double_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    database = Database(url)
    upgrade(database)
    old = UsageRecorder(database)
    for minute in range(50):  # old rows both processes will try to roll up at the same time
        old.add(event(NOW - timedelta(days=2, minutes=minute), key_id="old", prompt_tokens=1))
    old.flush()
    rounds, processes = 60, 2
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    children = [context.Process(target=flush_rounds, args=(url, NOW, NOW, rounds, barrier)) for _ in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    totals = {t.key_id: t.counters for t in usage_totals(database, EVERYTHING)}
    assert totals["k1"] == Counters(
        requests=rounds * processes, prompt_tokens=PROMPT_TOKENS * rounds * processes, completion_tokens=COMPLETION_TOKENS * rounds * processes
    )
    assert totals["old"] == Counters(requests=50, prompt_tokens=50)
    assert {row.bucket_s for row in _rows(database) if row.key_id == "old"} == {HOUR_S}
    database.close()


def _bench(kind: str, unit: str, variants: list[VariantResult]) -> BenchResult:
    return BenchResult(target="http://127.0.0.1:8000", workload={"kind": kind}, cost_unit=unit, settings={}, cost_model={}, variants=variants)


def _variant(model: str, version: int | None, quantization: str | None, **throughputs: float) -> VariantResult:
    points = [PointResult(mode="closed", level=level, stats={name: value * level for name, value in throughputs.items()}, cost={}) for level in (1, 2)]
    return VariantResult(model=model, version=version, quantization=quantization, points=points)


def test_bench_figures_price_each_model_version_and_a_model_without_one_says_why(tmp_path: Path) -> None:
    bench_dir = tmp_path / "state" / "bench"
    compare = _bench("chat", "output_tokens", [_variant("llm", 1, "fp32", output_tokens_per_s=5.0), _variant("llm", 2, "int4", output_tokens_per_s=20.0)])
    write_result(compare, bench_dir / RUNS_DIR / "20261201T000000Z", tmp_path / "state")
    plain = _bench("embeddings", "inputs", [_variant("embed", None, None, inputs_per_s=50.0)])
    write_result(plain, bench_dir / RUNS_DIR / "20261202T000000Z", tmp_path / "state")  # latest.json is now this one
    prices = PriceList.from_bench_dir(bench_dir, ROUND_COST)
    v2 = prices.price("llm", "2")
    assert v2 is not None and v2.unit == "completion_tokens" and v2.per_1k == pytest.approx(1.0 / 40.0)  # best point: 40 tokens/s
    assert "v2 int4" in v2.basis and "appliance bench" in v2.basis
    assert prices.price("llm", "1").per_1k == pytest.approx(1.0 / 10.0)  # type: ignore[union-attr]
    assert prices.price("llm", "7") is None  # a compare run prices only the versions it measured
    embed = prices.price("embed", "3")  # a plain run prices whatever version served
    assert embed is not None and embed.unit == "embedding_inputs" and embed.per_1k == pytest.approx(1.0 / 100.0)
    assert embed.cost(Counters(requests=2, embedding_inputs=500)) == pytest.approx(0.005)
    assert prices.price("rerank-model", "1") is None
    assert "appliance bench --model rerank-model" in prices.why_unpriced("rerank-model")


def test_the_report_sums_per_key_group_and_model_prices_what_it_can_and_writes_csv(database: Database, tmp_path: Path) -> None:
    keys = KeyStore(database)
    _, alice = keys.create("alice", group="team-a")
    _, carol = keys.create("carol", group="team-a")
    recorder = UsageRecorder(database)
    recorder.add(event(NOW, alice.prefix, model="llm", version="2", prompt_tokens=100, completion_tokens=4000))
    recorder.add(event(NOW, carol.prefix, model="llm", version="2", prompt_tokens=10, completion_tokens=1000))
    recorder.add(event(NOW, carol.prefix, model="unmeasured", version="1", prompt_tokens=7))
    recorder.add(event(NOW, "", model="llm", version="2", completion_tokens=2000))  # auth off
    recorder.add(event(NOW, carol.prefix, model="(unknown)", version="", status=404))
    recorder.flush()
    bench_dir = tmp_path / "bench"
    write_result(_bench("chat", "output_tokens", [_variant("llm", 2, "int4", output_tokens_per_s=0.5)]), bench_dir / RUNS_DIR / "r1", None)
    report = build_report(database, EVERYTHING, PriceList.from_bench_dir(bench_dir, ROUND_COST), {("llm", "2"): "int4"})
    by_key = {summary.name: summary for summary in report.summary("key")}
    assert by_key["alice"].cost == pytest.approx(4.0)  # 4000 tokens at 1.0 per 1k (1 token/s at the best point)
    assert by_key["carol"].cost == pytest.approx(1.0) and by_key["carol"].unpriced_lines == 1  # the 404 costs 0
    assert by_key["(no key)"].completion_tokens == 2000
    (team,) = [s for s in report.summary("group") if s.name == "team-a"]
    assert (team.requests, team.errors_4xx, team.prompt_tokens, team.cost) == (4, 1, 117, pytest.approx(5.0))
    assert report.total().cost == pytest.approx(7.0)
    assert report.unpriced() == {"unmeasured": PriceList.why_unpriced("unmeasured")}
    assert report.cost_notes()["(unknown)"] == ERRORS_ONLY_BASIS
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
    carol_llm = next(row for row in rows if row["key"] == "carol" and row["model"] == "llm")
    assert (carol_llm["group"], carol_llm["variant"], carol_llm["completion_tokens"], float(carol_llm["cost"])) == ("team-a", "int4", "1000", 1.0)
    only_alice = build_report(database, UsageFilter(EVERYTHING.since, EVERYTHING.until, key_id=alice.prefix), PriceList([], ROUND_COST))
    assert [line.key for line in only_alice.lines] == ["alice"] and only_alice.lines[0].cost is None


def test_periods_and_names_are_checked() -> None:
    assert parse_time("2026-12-01", "since") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_time("2026-12-01", "until", end=True) == datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_time("7d", "since", now=NOW) == NOW - timedelta(days=7)
    with pytest.raises(InvalidInput, match="since: 'last tuesday' is not a date"):
        parse_time("last tuesday", "since")
    with pytest.raises(InvalidInput, match="is not before until"):
        UsageFilter(NOW, NOW - timedelta(hours=1))
    with pytest.raises(ConfigError, match="SQLite or PostgreSQL, not 'mysql'"):
        check_dialect("mysql")


def test_migration_0004_adds_key_groups_and_usage_counts_and_goes_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'migrate.db'}")
    assert upgrade(db) == head_revision()
    assert "usage_counts" in inspect(db.engine).get_table_names()
    assert "key_group" in {column["name"] for column in inspect(db.engine).get_columns("api_keys")}
    KeyStore(db).create("kept", group="team-a")
    command.downgrade(alembic_config(db), "0003_model_policies")
    assert "usage_counts" not in inspect(db.engine).get_table_names()
    assert "key_group" not in {column["name"] for column in inspect(db.engine).get_columns("api_keys")}
    assert upgrade(db) == head_revision()
    assert [(info.name, info.group) for info in KeyStore(db).list()] == [("kept", None)]
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(UsageCount)) == 0
    db.close()


def test_usage_counts_on_postgresql_stay_correct_with_concurrent_writers(postgres_url: str) -> None:
    pytest.importorskip("psycopg")
    databases = [Database(postgres_url) for _ in range(3)]
    command.downgrade(alembic_config(databases[0]), "base")
    upgrade(databases[0])
    old = UsageRecorder(databases[0])
    for minute in range(40):
        old.add(event(NOW - timedelta(days=2, minutes=minute), key_id="old", prompt_tokens=1))
    old.flush()
    rounds = 40
    barrier = threading.Barrier(2)

    def writer(database: Database) -> None:
        recorder = UsageRecorder(database)
        barrier.wait()
        for _ in range(rounds):
            recorder.add(event(NOW, prompt_tokens=PROMPT_TOKENS))
            recorder.flush()
        barrier.wait()
        roll_up(database, NOW)

    threads = [threading.Thread(target=writer, args=(database,)) for database in databases[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    totals = {t.key_id: t.counters for t in usage_totals(databases[0], EVERYTHING)}
    assert totals["k1"] == Counters(requests=2 * rounds, prompt_tokens=2 * rounds * PROMPT_TOKENS)
    assert totals["old"] == Counters(requests=40, prompt_tokens=40)
    assert {row.bucket_s for row in _rows(databases[0]) if row.key_id == "old"} == {HOUR_S}
    for database in databases:
        database.close()


def test_keys_get_a_group_on_create_and_update_from_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()

    def keys(*args: str) -> Result:
        return runner.invoke(cli_app, ["keys", *args, "--state-dir", str(tmp_path)], catch_exceptions=False)

    assert keys("create", "ci", "--group", "team-a", "--quiet").exit_code == 0
    assert [(k["name"], k["group"]) for k in json.loads(keys("list", "--json").output)] == [("ci", "team-a")]
    moved = keys("update", "ci", "--group", "team-b")
    assert moved.exit_code == 0 and "in group 'team-b'" in moved.output
    assert keys("update", "ci", "--group", "").exit_code == 0
    assert json.loads(keys("list", "--json").output)[0]["group"] is None
    nothing = keys("update", "ci")
    assert nothing.exit_code == 2 and "nothing to update" in nothing.stderr
    bad = keys("update", "ci", "--group", "=sum(A1)")
    assert bad.exit_code == 1 and "not a valid group name" in bad.stderr
    assert keys("update", "ghost", "--group", "x").exit_code == 1
