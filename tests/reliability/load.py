"""A bounded load mix against a served appliance: N client threads for T seconds.

Each client keeps one HTTP connection (like a real SDK) and cycles through the calls it is
given: plain and streamed chat, embeddings, V2 infer. Every answer is judged on the spot:

- 200 must be well-formed for its kind (a chat with a message, a stream of parseable SSE
  chunks ending in `[DONE]`, one embedding per input, V2 outputs with data);
- 429 must carry Retry-After (capacity reached is an answer, never a hang), and the client
  then waits as asked, as a polite SDK does;
- anything else, a transport error (a dropped connection) or no answer within the client
  timeout is a failure, listed with what was sent.

Only loopback is ever targeted, and every loop is bounded in count and in time. Only tests
import this module.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

#: No request may go unanswered longer than this (a hang is a failure, not a slow success).
CLIENT_TIMEOUT_S = 120.0
#: Hard stop on the number of requests one client sends in one run.
MAX_REQUESTS_PER_CLIENT = 100_000
#: A client told to retry later waits what Retry-After says, at most this long.
RETRY_AFTER_CAP_S = 2.0


@dataclass(frozen=True)
class Call:
    """One kind of request the mix sends and how to judge a 200."""

    kind: str
    path: str
    body: dict[str, object]
    stream: bool = False


@dataclass
class LoadReport:
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    ok_latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, call: Call, status: int, latency_s: float, problem: str | None) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.by_kind[f"{call.kind}:{status}"] += 1
            if problem is not None:
                self.failures.append(f"{call.kind} {call.path} -> {status}: {problem}"[:400])
            elif status == 200:
                self.ok_latencies_s.append(latency_s)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def percentile_s(self, fraction: float) -> float:
        ordered = sorted(self.ok_latencies_s)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0

    def summary(self) -> str:
        return (
            f"{self.total} requests in {self.elapsed_s:.1f} s ({self.total / max(self.elapsed_s, 1e-9):.1f}/s); "
            f"statuses {dict(sorted(self.statuses.items()))}; failures {len(self.failures)}; "
            f"p50 {self.percentile_s(0.5):.3f} s, p99 {self.percentile_s(0.99):.3f} s"
        )


def _well_formed(call: Call, body: dict[str, object]) -> str | None:
    if call.kind == "chat":
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or "message" not in choices[0]:
            return "chat answer without a message"
        if not isinstance(body.get("usage"), dict):
            return "chat answer without usage"
    elif call.kind == "embeddings":
        data = body.get("data")
        inputs = call.body["input"]
        expected = len(inputs) if isinstance(inputs, list) else 1
        if not isinstance(data, list) or len(data) != expected or not all(item.get("embedding") for item in data):
            return "embeddings answer without one vector per input"
    elif call.kind == "infer":
        outputs = body.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(output.get("data") for output in outputs):
            return "V2 answer without output data"
    return None


def _read_stream(response: httpx.Response) -> str | None:
    """Reads the whole SSE stream; returns a problem or None."""
    done = False
    chunks = 0
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            return f"unparseable SSE chunk {payload[:80]!r}"
        if "error" in chunk:
            return f"error inside the stream: {chunk['error']}"
        chunks += 1
    if not done:
        return f"stream ended without [DONE] after {chunks} chunks"
    return None if chunks else "stream without chunks"


def send(client: httpx.Client, base_url: str, call: Call, report: LoadReport) -> float:
    """Send one call and judge the answer; returns the seconds a 429 asked to wait."""
    started = time.monotonic()
    wait_s = 0.0
    status = 0
    problem: str | None = None
    try:
        if call.stream:
            with client.stream("POST", base_url + call.path, json=call.body) as response:
                status = response.status_code
                if status == 200:
                    problem = _read_stream(response)
                else:
                    response.read()
                    problem = _judge_refusal(response)
                    wait_s = _retry_after(response)
        else:
            response = client.post(base_url + call.path, json=call.body)
            status = response.status_code
            if status == 200:
                try:
                    problem = _well_formed(call, response.json())
                except ValueError:
                    problem = "200 with a body that is not JSON"
            else:
                problem = _judge_refusal(response)
                wait_s = _retry_after(response)
    except httpx.TimeoutException:
        problem = f"no answer within {CLIENT_TIMEOUT_S:.0f} s"
    except httpx.TransportError as exc:
        problem = f"connection dropped: {exc.__class__.__name__}: {exc}"
    report.record(call, status, time.monotonic() - started, problem)
    return wait_s


def _retry_after(response: httpx.Response) -> float:
    """A polite client waits as a 429 asks (capped, so a run stays bounded in time)."""
    if response.status_code != 429:
        return 0.0
    try:
        return min(float(response.headers.get("retry-after", "0")), RETRY_AFTER_CAP_S)
    except ValueError:
        return 0.0


def _judge_refusal(response: httpx.Response) -> str | None:
    if response.status_code == 429:
        return None if response.headers.get("retry-after") else "429 without Retry-After"
    return response.text[:200] or "empty body"


def run_load(
    base_url: str,
    headers: dict[str, str],
    calls: list[Call],
    *,
    clients: int,
    duration_s: float,
    while_running: Callable[[], None] | None = None,
) -> LoadReport:
    """`clients` threads cycle through `calls` for `duration_s`; `while_running` is called about
    every 0.2 s meanwhile (sampling connections, memory)."""
    report = LoadReport()
    stop = threading.Event()

    def client_loop(index: int) -> None:
        with httpx.Client(headers=headers, timeout=CLIENT_TIMEOUT_S) as client:
            for count in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                wait_s = send(client, base_url, calls[(index + count) % len(calls)], report)
                if wait_s:
                    stop.wait(wait_s)

    threads = [threading.Thread(target=client_loop, args=(index,), name=f"load-{index}") for index in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while time.monotonic() - started < duration_s:
        if while_running is not None:
            while_running()
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=CLIENT_TIMEOUT_S + 10)
    report.elapsed_s = time.monotonic() - started
    hung = [thread.name for thread in threads if thread.is_alive()]
    if hung:
        report.failures.append(f"clients still waiting after the run: {hung}")
    return report
