"""Deadline-aware admission: refuse at once what would only time out in the queue.

A request that waits behind more work than the box can finish before its deadline would end
in a 504 after holding a connection for the whole deadline. By Little's law the time a new
sequence spends in the engine is about (sequences in the engine, itself included) / (sequences
finished per second); when that passes the request's deadline, admission answers 429 with a
Retry-After instead. The rate is measured from recent completions, so it follows whatever the
box and the workload do; with too little evidence (a fresh or idle engine) everyone is admitted.

Never imports onnxruntime.
"""

from __future__ import annotations

import time
from collections import deque

#: Completions older than this no longer describe the box's throughput.
SERVICE_WINDOW_S = 30.0
#: Fewest completions in the window before anyone is refused on the estimate.
SERVICE_MIN_SAMPLES = 4
#: Shortest span the rate is computed over (completions of one batch land together).
MIN_RATE_SPAN_S = 0.05


class ThroughputTracker:
    """Sequences finished per second over a sliding window. `record` runs on the engine
    thread; `expected_stay_s` on request threads reads one tuple, assigned atomically."""

    def __init__(self) -> None:
        self._finished: deque[float] = deque()
        self._rate: tuple[float, float] | None = None  # (sequences per second, measured at)

    def record(self) -> None:
        now = time.monotonic()
        self._finished.append(now)
        while now - self._finished[0] > SERVICE_WINDOW_S:
            self._finished.popleft()
        if len(self._finished) >= SERVICE_MIN_SAMPLES:
            span = max(now - self._finished[0], MIN_RATE_SPAN_S)
            self._rate = ((len(self._finished) - 1) / span, now)

    def expected_stay_s(self, in_engine: int) -> float | None:
        """Expected seconds from admission to finish with `in_engine` sequences (the new one
        included); None without recent evidence."""
        measured = self._rate
        if measured is None or time.monotonic() - measured[1] > SERVICE_WINDOW_S or measured[0] <= 0:
            return None
        return in_engine / measured[0]
