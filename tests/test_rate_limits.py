"""Rate limits per key and per key group: the shared counts (two processes on one database),
429 with OpenAI's headers over HTTP, a group's limits shared by its keys on top of each key's
(the tighter one reported, refusals naming whose limit it was), token limits that never cut an
admitted stream, the CLI flags and commands, and the migrations."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from appliance.config import load_settings
from appliance.errors import InvalidInput
from appliance.store.audit import AuditFilter, AuditLog
from appliance.store.db import Database
from appliance.store.key_groups import GroupStore
from appliance.store.keys import KeyStore
from appliance.store.models import KeyGroup
from appliance.store.migrate import upgrade
from appliance.store.rate_limits import (
    DAY_S,
    LIMIT_MAX,
    MINUTE_S,
    MONTH_S,
    RateLimiter,
    RateLimits,
    RateWindow,
    group_quota,
    key_quota,
)
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[1]
#: A fixed instant in the middle of a minute (and of a day).
T0 = 1_800_000_030.0
PER_PROCESS = 12
RPM_ACROSS_PROCESSES = 15
#: The rate-limit subject of the key "k".
KEY_K = "key:k"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'limits.db'}")
    upgrade(database)
    yield database
    database.close()


def test_requests_per_minute_refuse_with_headers_and_reset_with_the_window(database: Database) -> None:
    clock = Clock()
    limiter = RateLimiter(database, clock=clock)
    limits = RateLimits(rpm=3)
    k1 = [key_quota("k1", limits)]
    decisions = [limiter.admit(k1) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["2", "1", "0", "0"]
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "3"
    assert decisions[0].headers["x-ratelimit-reset-requests"] == "30s"
    assert decisions[3].retry_after_s == pytest.approx(30.0) and "3 requests per minute" in decisions[3].reason
    assert limiter.admit([key_quota("k2", limits)]).allowed, "another key has its own window"
    clock.now += MINUTE_S
    assert limiter.admit(k1).allowed


def test_token_limits_count_finished_requests_per_minute_and_per_day(database: Database) -> None:
    clock = Clock()
    limiter = RateLimiter(database, clock=clock)
    k = [key_quota("k", RateLimits(tpm=100, tokens_per_day=250))]
    assert limiter.admit(k).allowed
    limiter.charge([KEY_K], 120)
    refused = limiter.admit(k)
    assert not refused.allowed and "100 tokens per minute" in refused.reason
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now += MINUTE_S
    assert limiter.admit(k).allowed
    limiter.charge([KEY_K], 130)
    clock.now += MINUTE_S
    by_day = limiter.admit(k)
    assert not by_day.allowed and "250 tokens per day" in by_day.reason
    assert by_day.retry_after_s == pytest.approx(DAY_S - (T0 % DAY_S) - 2 * MINUTE_S)


def test_a_monthly_token_budget_spans_days_and_resets_with_the_calendar_month(database: Database) -> None:
    start = datetime(2027, 1, 30, 12, 0, tzinfo=UTC).timestamp()
    clock = Clock(start)
    limiter = RateLimiter(database, clock=clock)
    k = [key_quota("k", RateLimits(tokens_per_month=500))]
    assert limiter.admit(k).allowed
    limiter.charge([KEY_K], 300)
    clock.now += DAY_S  # the 31st: a new day, the same month
    assert limiter.admit(k).allowed
    limiter.charge([KEY_K], 250)
    clock.now += 3600
    refused = limiter.admit(k)
    assert not refused.allowed and "500 tokens per month" in refused.reason
    february = datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    assert refused.retry_after_s == pytest.approx(february - clock.now)
    assert not limiter.day_budget(k).allowed, "batch lines wait for the month's end too"
    clock.now = february + 1
    assert limiter.admit(k).allowed and limiter.day_budget(k).allowed
    limiter.charge([KEY_K], 10)
    clock.now += 70 * DAY_S
    limiter.admit(k)
    limiter.charge([KEY_K], 1)
    limiter.flush()
    with database.session() as session:
        months = session.scalars(select(RateWindow.window_start).where(RateWindow.window_s == MONTH_S)).all()
    assert datetime(2027, 1, 1, tzinfo=UTC).timestamp() not in months, "old month rows are deleted"


def test_a_group_limit_is_shared_by_its_keys_and_the_tighter_remaining_is_reported(database: Database) -> None:
    limiter = RateLimiter(database, clock=Clock())
    group = group_quota("team-a", RateLimits(rpm=4))
    loose, tight = [key_quota("k1", RateLimits(rpm=10)), group], [key_quota("k2", RateLimits(rpm=1)), group]
    first = limiter.admit(loose)
    assert first.headers["x-ratelimit-limit-requests"] == "4" and first.headers["x-ratelimit-remaining-requests"] == "3"
    second = limiter.admit(tight)
    assert second.allowed and second.headers["x-ratelimit-limit-requests"] == "1", "the key's 0 left is tighter than the group's 2"
    by_key = limiter.admit(tight)
    assert not by_key.allowed and by_key.reason == "rate limit: 1 requests per minute for this key"
    assert [limiter.admit(loose).allowed for _ in range(3)] == [True, True, False], "the key's refusal used none of the group's share"
    by_group = limiter.admit(loose)
    assert not by_group.allowed and "4 requests per minute for group 'team-a'" in by_group.reason
    assert by_group.retry_after_s == pytest.approx(30.0) and by_group.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_group_token_budget_counts_every_key_and_holds_batch_lines(database: Database) -> None:
    limiter = RateLimiter(database, clock=Clock())
    group = group_quota("team-b", RateLimits(tokens_per_day=100))
    assert limiter.admit([group]).allowed
    limiter.charge([key_quota("k1", RateLimits(tpm=1000)).subject, group.subject], 60)
    limiter.charge([group.subject], 50)
    refused = limiter.admit([key_quota("k2", RateLimits(tpm=1000)), group])
    assert not refused.allowed and "100 tokens per day for group 'team-b'" in refused.reason
    assert refused.headers["x-ratelimit-limit-tokens"] == "1000", "the group has no per-minute token limit to report"
    assert "group 'team-b'" in limiter.day_budget([key_quota("k3", RateLimits()), group]).reason


def test_bad_group_limits_are_refused_naming_the_field_and_removing_the_last_limit_drops_the_row(database: Database) -> None:
    groups = GroupStore(database)
    for bad, field in (({"rpm": -1}, "rpm"), ({"tokens_per_month": LIMIT_MAX + 1}, "tokens-per-month")):
        with pytest.raises(InvalidInput, match=f"^{field}: must be between 1 and"):
            groups.set_limits("team", **bad, actor="t", address="local")
    for name in ("", "two words", "x" * 65):
        with pytest.raises(InvalidInput, match="^group: "):
            groups.set_limits(name, rpm=5, actor="t", address="local")
    assert groups.set_limits("team", rpm=5, actor="t", address="local").limits == RateLimits(rpm=5)
    assert groups.set_limits("team", rpm=0, actor="t", address="local").limits == RateLimits()
    assert groups.list() == [], "a group with no keys and no limits is gone"
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(KeyGroup)) == 0


def _admit_many(url: str, clock_at: float, worker: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """In each process: one key's requests, and those of another key of a shared group (each
    process is a different key there, with a key limit of its own that never binds)."""
    limiter = RateLimiter(Database(url), clock=lambda: clock_at)
    limits = RateLimits(rpm=RPM_ACROSS_PROCESSES)
    by_key = [key_quota("shared", limits)]
    by_group = [key_quota(f"k{worker}", RateLimits(rpm=100)), group_quota("team", limits)]
    results.put(tuple(sum(limiter.admit(quotas).allowed for _ in range(PER_PROCESS)) for quotas in (by_key, by_group)))


def test_key_and_group_limits_hold_across_two_processes_on_one_database(database: Database, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_admit_many, args=(url, T0, index, results)) for index in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    allowed = [results.get(timeout=10) for _ in workers]
    assert [sum(counts) for counts in zip(*allowed)] == [RPM_ACROSS_PROCESSES, RPM_ACROSS_PROCESSES]


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("limits-state")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    with running_server(state, generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


def _limited_key(server: RunningServer, name: str, limits: RateLimits = RateLimits(), group: str | None = None) -> str:
    key, _ = KeyStore(server.app.state.ctx.database).create(name, ["infer"], limits=limits, group=group)
    return key


def _group_limits(server: RunningServer, group: str, **limits: int) -> None:
    GroupStore(server.app.state.ctx.database).set_limits(group, **limits, actor="test", address="local")


def _models(server: RunningServer, key: str) -> httpx.Response:
    """The cheapest request that counts toward a key's requests per minute."""
    return httpx.get(server.url("/v1/models"), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _chat(server: RunningServer, key: str, **extra: object) -> httpx.Response:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(server.url("/v1/chat/completions"), json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_the_eleventh_request_a_minute_gets_429_with_openai_headers_and_passes_after_reset(server: RunningServer) -> None:
    clock = Clock(T0)
    server.app.state.ctx.rate_limiter._clock = clock
    key = _limited_key(server, "ten-a-minute", RateLimits(rpm=10))
    answers = [_chat(server, key) for _ in range(11)]
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "10"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "9"
    refused = answers[10]
    assert refused.headers["retry-after"] == "30" and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "10 requests per minute" in refused.json()["error"]["message"]
    clock.now += MINUTE_S
    assert _chat(server, key).status_code == 200
    unlimited = httpx.post(
        server.url("/v1/chat/completions"),
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=server.auth(),
        timeout=60,
    )
    assert unlimited.status_code == 200 and "x-ratelimit-limit-requests" not in unlimited.headers


def test_a_token_limit_never_cuts_an_admitted_stream_and_refuses_the_next_request(server: RunningServer) -> None:
    server.app.state.ctx.rate_limiter._clock = Clock(T0 + 10 * MINUTE_S)
    key = _limited_key(server, "thirty-tokens", RateLimits(tpm=30))
    body = {
        "model": "tiny-llama", "messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 40, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["x-ratelimit-limit-tokens"] == "30"
        frames = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    usage = json.loads(frames[-1][6:])["usage"]
    assert usage["completion_tokens"] == 40, "the stream ran to its end although it passed the limit"
    refused = _chat(server, key)
    assert refused.status_code == 429 and "30 tokens per minute" in refused.json()["error"]["message"]


def test_two_keys_share_their_groups_ten_requests_a_minute_and_the_eleventh_is_refused_naming_the_group(
    server: RunningServer,
) -> None:
    clock = Clock(T0 + 20 * MINUTE_S)
    server.app.state.ctx.rate_limiter._clock = clock
    _group_limits(server, "team-a", rpm=10)
    first, second = _limited_key(server, "team-a-1", group="team-a"), _limited_key(server, "team-a-2", group="team-a")
    answers = [_models(server, first if index % 2 else second) for index in range(11)]
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["9", "8", "7"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "10" and answers[0].headers["x-ratelimit-reset-requests"] == "30s"
    refused = answers[10]
    assert refused.headers["retry-after"] == "30" and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["message"] == "rate limit: 10 requests per minute for group 'team-a' (shared by its keys)"
    clock.now += MINUTE_S
    assert _models(server, first).status_code == 200 and _models(server, second).status_code == 200


def test_a_keys_tighter_limit_wins_over_its_groups_and_keys_outside_the_group_are_unaffected(server: RunningServer) -> None:
    server.app.state.ctx.rate_limiter._clock = Clock(T0 + 30 * MINUTE_S)
    _group_limits(server, "team-b", rpm=10)
    tight = _limited_key(server, "team-b-tight", RateLimits(rpm=2), group="team-b")
    loose = _limited_key(server, "team-b-loose", group="team-b")
    outside = _limited_key(server, "outside", group="team-z")
    answers = [_models(server, tight) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [(a.headers["x-ratelimit-limit-requests"], a.headers["x-ratelimit-remaining-requests"]) for a in answers] == [
        ("2", "1"), ("2", "0"), ("2", "0"),
    ]
    assert answers[2].json()["error"]["message"] == "rate limit: 2 requests per minute for this key"
    shared = _models(server, loose)
    assert shared.headers["x-ratelimit-remaining-requests"] == "7", "the refused request used none of the group's share"
    assert all(_models(server, outside).status_code == 200 for _ in range(12))
    assert "x-ratelimit-limit-requests" not in _models(server, outside).headers


def test_a_group_token_limit_never_cuts_a_stream_and_refuses_the_groups_next_request(server: RunningServer) -> None:
    server.app.state.ctx.rate_limiter._clock = Clock(T0 + 40 * MINUTE_S)
    _group_limits(server, "team-c", tpm=30)
    streamer, other = _limited_key(server, "team-c-1", group="team-c"), _limited_key(server, "team-c-2", group="team-c")
    body = {
        "model": "tiny-llama", "messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 40, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, headers={"Authorization": f"Bearer {streamer}"}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["x-ratelimit-limit-tokens"] == "30"
        frames = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert json.loads(frames[-1][6:])["usage"]["completion_tokens"] == 40, "the stream ran to its end although it passed the limit"
    refused = _chat(server, other)
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "30 tokens per minute for group 'team-c'" in refused.json()["error"]["message"]


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"APPLIANCE_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_keys_cli_sets_shows_and_clears_limits(tmp_path: Path) -> None:
    created = _cli(tmp_path, "keys", "create", "team-bot", "--rpm", "10", "--tpm", "5000")
    assert created.returncode == 0 and "10 requests/min, 5000 tokens/min" in created.stdout
    updated = _cli(
        tmp_path, "keys", "update", "team-bot", "--rpm", "0", "--tokens-per-day", "100000", "--tokens-per-month", "2000000",
        "--priority", "batch",
    )
    assert updated.returncode == 0 and "5000 tokens/min, 100000 tokens/day, 2000000 tokens/month, priority batch" in updated.stdout
    listed = json.loads(_cli(tmp_path, "keys", "list", "--json").stdout)
    assert listed[0]["limits"] == {"rpm": None, "tpm": 5000, "tokens_per_day": 100000, "tokens_per_month": 2000000}
    assert listed[0]["priority"] == "batch"
    unknown = _cli(tmp_path, "keys", "update", "team-bot", "--priority", "urgent")
    assert unknown.returncode != 0 and "priority" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = _cli(tmp_path, "keys", "update", "team-bot", "--rpm", "-5", "--group", "ops")
    assert bad.returncode != 0 and "rpm" in bad.stderr and "Traceback" not in bad.stderr
    settings = load_settings(state_dir=tmp_path)
    database = Database(settings.db_url)
    assert KeyStore(database).find("team-bot").group is None, "a refused update writes nothing"
    database.close()


def test_keys_cli_sets_lists_and_removes_group_limits_and_refuses_bad_values(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    database = Database(settings.db_url)
    upgrade(database)
    for name in ("ops-1", "ops-2"):
        KeyStore(database).create(name, group="ops")
    set_ = _cli(tmp_path, "keys", "group-limits", "ops", "--rpm", "100", "--tokens-per-month", "5000000")
    assert set_.returncode == 0 and "group 'ops': 2 keys (2 active), 100 requests/min, 5000000 tokens/month" in set_.stdout
    removed = _cli(tmp_path, "keys", "group-limits", "ops", "--rpm", "0", "--tpm", "800")
    assert removed.returncode == 0 and "800 tokens/min, 5000000 tokens/month" in removed.stdout and "requests/min" not in removed.stdout
    listed = json.loads(_cli(tmp_path, "keys", "groups", "--json").stdout)
    assert [(g["name"], g["keys"], g["limits"]) for g in listed] == [
        ("ops", 2, {"rpm": None, "tpm": 800, "tokens_per_day": None, "tokens_per_month": 5000000})
    ]
    bad = _cli(tmp_path, "keys", "group-limits", "ops", "--tpm", "-5")
    assert bad.returncode != 0 and "error: tpm: must be between 1 and" in bad.stderr and "Traceback" not in bad.stderr
    assert GroupStore(database).get("ops").limits == RateLimits(tpm=800, tokens_per_month=5000000), "refused: nothing written"
    assert [(e.actor, e.action, e.target) for e in AuditLog(database).query(AuditFilter(action="group."))] == [
        ("cli", "group.update", "ops"), ("cli", "group.update", "ops"),
    ]
    database.close()


def test_migration_0008_counts_groups_keeps_key_counts_and_goes_back(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from appliance.store.migrate import alembic_config, head_revision

    db = Database(f"sqlite:///{tmp_path / 'migrate.db'}")
    upgrade(db, "0007_monthly_tokens")
    with db.session() as session:
        session.execute(text(f"INSERT INTO rate_windows VALUES ('abc123', {MINUTE_S}, {int(T0) // MINUTE_S * MINUTE_S}, 2, 0)"))
    assert upgrade(db) == head_revision()
    limiter = RateLimiter(db, clock=Clock())
    key = [key_quota("abc123", RateLimits(rpm=3))]
    assert [limiter.admit(key).allowed for _ in range(2)] == [True, False], "the key's count survived the upgrade"
    GroupStore(db).set_limits("team", rpm=5, actor="t", address="local")
    assert limiter.admit([group_quota("team", RateLimits(rpm=5))]).allowed
    command.downgrade(alembic_config(db), "0007_monthly_tokens")
    assert "key_groups" not in inspect(db.engine).get_table_names()
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT key_id, requests FROM rate_windows")).all() == [("abc123", 4)]
    assert upgrade(db) == head_revision()
    assert not limiter.admit(key).allowed
    db.close()


def test_migration_0005_adds_limits_and_windows_and_goes_back(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from appliance.store.migrate import alembic_config, head_revision

    db = Database(f"sqlite:///{tmp_path / 'migrate.db'}")
    assert upgrade(db) == head_revision()
    assert "rate_windows" in inspect(db.engine).get_table_names()
    KeyStore(db).create("kept", limits=RateLimits(rpm=5))
    command.downgrade(alembic_config(db), "0004_usage")
    assert "rate_windows" not in inspect(db.engine).get_table_names()
    assert "rate_rpm" not in {column["name"] for column in inspect(db.engine).get_columns("api_keys")}
    assert upgrade(db) == head_revision()
    assert KeyStore(db).find("kept").limits == RateLimits()
    db.close()
