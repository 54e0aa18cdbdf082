"""Per-key rate limits: the shared counts (two processes on one database), 429 with OpenAI's
headers over HTTP, token limits that never cut an admitted stream, and the CLI flags."""

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
from sqlalchemy import select

from appliance.config import load_settings
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.migrate import upgrade
from appliance.store.rate_limits import DAY_S, MINUTE_S, MONTH_S, RateLimiter, RateLimits, RateWindow
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[1]
#: A fixed instant in the middle of a minute (and of a day).
T0 = 1_800_000_030.0
PER_PROCESS = 12
RPM_ACROSS_PROCESSES = 15


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
    decisions = [limiter.admit("k1", limits) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["2", "1", "0", "0"]
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "3"
    assert decisions[0].headers["x-ratelimit-reset-requests"] == "30s"
    assert decisions[3].retry_after_s == pytest.approx(30.0) and "3 requests per minute" in decisions[3].reason
    assert limiter.admit("k2", limits).allowed, "another key has its own window"
    clock.now += MINUTE_S
    assert limiter.admit("k1", limits).allowed


def test_token_limits_count_finished_requests_per_minute_and_per_day(database: Database) -> None:
    clock = Clock()
    limiter = RateLimiter(database, clock=clock)
    limits = RateLimits(tpm=100, tokens_per_day=250)
    assert limiter.admit("k", limits).allowed
    limiter.charge("k", 120)
    refused = limiter.admit("k", limits)
    assert not refused.allowed and "100 tokens per minute" in refused.reason
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now += MINUTE_S
    assert limiter.admit("k", limits).allowed
    limiter.charge("k", 130)
    clock.now += MINUTE_S
    by_day = limiter.admit("k", limits)
    assert not by_day.allowed and "250 tokens per day" in by_day.reason
    assert by_day.retry_after_s == pytest.approx(DAY_S - (T0 % DAY_S) - 2 * MINUTE_S)


def test_a_monthly_token_budget_spans_days_and_resets_with_the_calendar_month(database: Database) -> None:
    start = datetime(2027, 1, 30, 12, 0, tzinfo=UTC).timestamp()
    clock = Clock(start)
    limiter = RateLimiter(database, clock=clock)
    limits = RateLimits(tokens_per_month=500)
    assert limiter.admit("k", limits).allowed
    limiter.charge("k", 300)
    clock.now += DAY_S  # the 31st: a new day, the same month
    assert limiter.admit("k", limits).allowed
    limiter.charge("k", 250)
    clock.now += 3600
    refused = limiter.admit("k", limits)
    assert not refused.allowed and "500 tokens per month" in refused.reason
    february = datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    assert refused.retry_after_s == pytest.approx(february - clock.now)
    assert not limiter.day_budget("k", limits).allowed, "batch lines wait for the month's end too"
    clock.now = february + 1
    assert limiter.admit("k", limits).allowed and limiter.day_budget("k", limits).allowed
    limiter.charge("k", 10)
    clock.now += 70 * DAY_S
    limiter.admit("k", limits)
    limiter.charge("k", 1)
    limiter.flush()
    with database.session() as session:
        months = session.scalars(select(RateWindow.window_start).where(RateWindow.window_s == MONTH_S)).all()
    assert datetime(2027, 1, 1, tzinfo=UTC).timestamp() not in months, "old month rows are deleted"


def _admit_many(url: str, clock_at: float, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    limiter = RateLimiter(Database(url), clock=lambda: clock_at)
    results.put(sum(limiter.admit("shared", RateLimits(rpm=RPM_ACROSS_PROCESSES)).allowed for _ in range(PER_PROCESS)))


def test_limits_hold_across_two_processes_on_one_database(database: Database, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limits.db'}"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_admit_many, args=(url, T0, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sum(results.get(timeout=10) for _ in workers) == RPM_ACROSS_PROCESSES


@pytest.fixture(scope="module")
def server(tiny_decoders: TinyDecoders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    state = tmp_path_factory.mktemp("limits-state")
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    with running_server(state, generation={"kv_budget_bytes": 64 << 20}) as running:
        yield running


def _limited_key(server: RunningServer, name: str, limits: RateLimits) -> str:
    key, _ = KeyStore(server.app.state.ctx.database).create(name, ["infer"], limits=limits)
    return key


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
