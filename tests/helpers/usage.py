"""Helpers for the usage accounting tests: a flusher that runs in its own process (started with
multiprocessing's spawn, so it imports this module fresh), and fixed-time events. Only tests
import this module."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from appliance.store.db import Database
from appliance.store.usage_recorder import UsageEvent, UsageRecorder
from appliance.store.usage_rollup import roll_up

#: Each event of the multi-process test counts this much.
PROMPT_TOKENS = 3
COMPLETION_TOKENS = 5


def event(at: datetime, key_id: str = "k1", model: str = "m", version: str = "1", status: int = 200, **counts: int) -> UsageEvent:
    return UsageEvent(at=at, key_id=key_id, model=model, version=version, status=status, **counts)


def flush_rounds(url: str, at: datetime, rollup_now: datetime, rounds: int, barrier: Any) -> None:
    """In a child process: after the barrier, `rounds` times add one event for the same row as
    the other children and flush it at once, then roll up old rows (at the same time as they do)."""
    database = Database(url)
    recorder = UsageRecorder(database)
    barrier.wait()
    for _ in range(rounds):
        recorder.add(event(at, prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS))
        recorder.flush()
    while recorder.pending_rows:  # a write that hit a lock is kept and retried
        recorder.flush()
    barrier.wait()
    roll_up(database, rollup_now)
    database.close()
