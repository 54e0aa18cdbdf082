"""Deadline-aware admission: refuse at once what would only time out in the queue.

A request that waits behind more work than the box can finish before its deadline would end
in a 504 after holding a connection for the whole deadline, and the prefill it got would be
wasted. By Little's law the time a new sequence spends in the engine is about (sequences in the
engine, itself included) / (sequences completed per second); when that fills too much of the
request's deadline, admission answers 429 with a Retry-After instead.

The rate is completions (stop or length) over the time the engine has been busy, up to a
sliding window. Timeouts and aborts do not count as service: counted as departures, a wave of
timeouts made the box look fast and let the next wave in (64 clients, 10 s deadline: 164 of 184
admitted streams still ran out). A busy engine that completes nothing has a rate of zero, so it
refuses until something finishes; a fresh or idle one admits everyone.

Never imports onnxruntime.
"""

from __future__ import annotations

import math
import time
from collections import deque

#: Completions older than this no longer describe the box's throughput.
SERVICE_WINDOW_S = 30.0
#: How long the engine must have been busy before its rate is trusted.
MIN_BUSY_S = 2.0
#: A pause between steps longer than this ends a busy period.
IDLE_GAP_S = 1.0
#: Share of the deadline the expected stay may fill. The estimate is a mean; half of the
#: deadline leaves room for the spread.
DEADLINE_SHARE = 0.5


class ThroughputTracker:
    """Completions per busy second over a sliding window. `step` and `completed` run on the
    engine thread; `refuses` on request threads (it reads a deque the engine appends to, which
    CPython keeps consistent for these operations)."""

    def __init__(self) -> None:
        self._completed: deque[float] = deque()
        self._busy_since: float | None = None
        self._last_step = 0.0

    def step(self) -> None:
        """The engine ran a step (marks it busy)."""
        now = time.monotonic()
        if self._busy_since is None or now - self._last_step > IDLE_GAP_S:
            self._busy_since = now
        self._last_step = now

    def completed(self) -> None:
        now = time.monotonic()
        self._completed.append(now)
        while now - self._completed[0] > SERVICE_WINDOW_S:
            self._completed.popleft()

    def expected_stay_s(self, in_engine: int) -> float | None:
        """Expected seconds from admission to completion with `in_engine` sequences (the new
        one included); None without enough evidence, infinity when nothing completes."""
        now = time.monotonic()
        if self._busy_since is None or now - self._last_step > IDLE_GAP_S:
            return None
        busy = now - self._busy_since
        if busy < MIN_BUSY_S:
            return None
        window = min(busy, SERVICE_WINDOW_S)
        recent = sum(1 for finished in list(self._completed) if now - finished <= window)
        if recent == 0:
            return math.inf
        return in_engine / (recent / window)

    def refuses(self, in_engine: int, deadline_s: float) -> float | None:
        """The expected stay when it does not fit `deadline_s` (then refuse), else None."""
        stay = self.expected_stay_s(in_engine)
        return stay if stay is not None and stay > DEADLINE_SHARE * deadline_s else None
