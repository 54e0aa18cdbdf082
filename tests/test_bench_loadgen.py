"""The load generator always stops by itself: bounded in count, and in time even against a
server that never answers or streams forever. Real HTTP servers on loopback play the
misbehaving servers; the appliance's own server is loaded in test_bench_e2e."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from appliance.benchmark.loadgen import PointPlan, run_point
from appliance.benchmark.stats import summarise
from appliance.benchmark.workloads import ChatWorkload, EmbeddingsWorkload, load_prompts

SENTENCES = 2


class _Handler(BaseHTTPRequestHandler):
    """Answers embeddings at once, or streams chat chunks forever, or never answers."""

    behaviour = "embeddings"
    received: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return None

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        type(self).received.append(self.path)
        if self.behaviour == "silent":
            time.sleep(5)
            return
        if self.behaviour == "embeddings":
            body = json.dumps({"data": [{"embedding": [0.0]}] * SENTENCES, "usage": {"prompt_tokens": 10}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
        try:
            while True:
                self.wfile.write(f"data: {chunk}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            return


@contextmanager
def _server(behaviour: str) -> Iterator[tuple[str, type[_Handler]]]:
    """A real HTTP server on a free loopback port; the handler class records request paths."""
    handler: type[_Handler] = type("Handler", (_Handler,), {"behaviour": behaviour, "received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _run(url: str, workload: Any, plan: PointPlan) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient(base_url=url, timeout=plan.request_timeout_s) as client:
            return await run_point(client, workload, plan)

    return asyncio.run(go())


def _chat() -> ChatWorkload:
    prompts, source = load_prompts(None)
    return ChatWorkload(model="m", prompts=prompts, source=source)


def _embeddings() -> EmbeddingsWorkload:
    prompts, source = load_prompts(None)
    return EmbeddingsWorkload(model="m", prompts=prompts, source=source, sentences_per_request=SENTENCES)


@pytest.mark.parametrize("mode,level", [("closed", 3.0), ("open", 500.0)])
def test_a_point_sends_exactly_warmup_plus_max_requests_when_time_allows(mode: str, level: float) -> None:
    plan = PointPlan(mode=mode, level=level, duration_s=60.0, max_requests=17, warmup_requests=2, request_timeout_s=10.0)  # type: ignore[arg-type]
    with _server("embeddings") as (url, handler):
        run = _run(url, _embeddings(), plan)
    assert len(handler.received) == 19
    stats = summarise(run.records, run.wall_s)
    assert stats.requests == stats.ok == 17 and stats.inputs == 17 * SENTENCES and stats.prompt_tokens == 170


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_ends_the_point_with_timeouts() -> None:
    plan = PointPlan(mode="closed", level=2.0, duration_s=0.5, max_requests=1000, warmup_requests=0, request_timeout_s=0.3)
    with _server("silent") as (url, _handler):
        run = _run(url, _embeddings(), plan)
    stats = summarise(run.records, run.wall_s)
    assert stats.ok == 0 and set(stats.errors_by_status) == {"timeout"}


@pytest.mark.timeout(60)
def test_a_stream_that_never_ends_is_cancelled_and_counted_when_the_point_runs_out() -> None:
    plan = PointPlan(mode="closed", level=2.0, duration_s=0.3, max_requests=1000, warmup_requests=0, request_timeout_s=0.3)
    with _server("endless-stream") as (url, _handler):
        run = _run(url, _chat(), plan)
    stats = summarise(run.records, run.wall_s)
    assert stats.ok == 0
    assert stats.errors_by_status == {"cancelled": 2}
