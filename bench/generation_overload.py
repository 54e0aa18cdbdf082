"""Benchmark: what clients get from a generation server driven past its capacity.

More streaming chat clients than the box can serve inside the request deadline, each a polite
SDK: it waits as Retry-After asks (capped), then sends again. Every request ends one way:

- `completed`: the stream finished (`finish_reason` stop or length) and ended in `[DONE]`;
- `deadline`: the stream started, then ended with the `deadline_exceeded` error event — the
  client waited, received part of an answer and lost it: the outcome overload must avoid;
- `429`: refused with Retry-After, at once or after queueing (the client retries);
- anything else (5xx, a transport error, no answer in time) is a failure.

Compared side by side, passes alternating, same model and settings: the server as configured
(a queued sequence is refused with 429 once it has waited `generation.max_queue_wait_s`) and
the same server with that wait as long as the deadline (the queue holds whatever fits it,
which is what the server did before the limit existed). Per pass: outcome counts, tokens
delivered in completed answers, tokens thrown away in deadline-cut ones, latency of the
completed answers.

    .venv/bin/python bench/generation_overload.py --state-dir DIR --model smollm2-135m-instruct \
        [--clients 64] [--seconds 25] [--max-tokens 64] [--deadline 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.benchmark.serverproc import PrivateServer  # noqa: E402
from appliance.benchmark.sse import SseDecoder, StreamError, StreamTally  # noqa: E402
from appliance.repository.store import ModelRepository  # noqa: E402

#: A polite client waits what Retry-After says, at most this long (SDKs cap their back-off too).
RETRY_AFTER_CAP_S = 2.0
#: Whatever the deadline, a client gives up on one answer after this long (a hang is a failure).
CLIENT_TIMEOUT_S = 180.0
TOPICS = ["rivers", "bread", "bicycles", "libraries", "volcanoes", "gardens", "trains", "music"]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    delivered_tokens: int = 0
    lost_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    #: When each deadline-cut request was sent, seconds after the pass began.
    cut_sent_at_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, tally: Tally, pass_start: float = 0.0) -> float:
    """Send one streamed chat; record its outcome; return how long to wait before the next."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    outcome, tokens, wait = "failure", 0, 0.0
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code == 429:
                outcome = "429"
                wait = min(float(response.headers.get("Retry-After", "1")), RETRY_AFTER_CAP_S)
                response.read()
            elif response.status_code != 200:
                outcome = f"http {response.status_code}"
                response.read()
            else:
                decoder, stream = SseDecoder(), StreamTally()
                try:
                    for piece in response.iter_text():
                        for payload in decoder.feed(piece):
                            stream.add(payload, 0.0)
                    for payload in decoder.close():
                        stream.add(payload, 0.0)
                except StreamError as exc:
                    outcome = "deadline" if exc.code == "deadline_exceeded" else f"error {exc.code or exc}"
                else:
                    if stream.done and stream.finish_reason in ("stop", "length"):
                        outcome = "completed"
                tokens = stream.output_tokens
    except httpx.HTTPError as exc:
        outcome = f"transport {type(exc).__name__}"
    elapsed = time.perf_counter() - started
    with tally.lock:
        tally.outcomes[outcome] += 1
        if outcome == "completed":
            tally.delivered_tokens += tokens
            tally.latencies_s.append(elapsed)
        elif outcome == "deadline":
            tally.lost_tokens += tokens
            tally.cut_sent_at_s.append(started - pass_start)
        elif outcome != "429":
            tally.failures.append(outcome)
    return wait


def run_pass(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> Tally:
    tally = Tally()
    pass_start = time.perf_counter()
    stop_at = pass_start + seconds

    def client_loop(index: int) -> None:
        prompt = f"Write a short paragraph for a school newsletter about {TOPICS[index % len(TOPICS)]} (note {index})."
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            while time.perf_counter() < stop_at:
                wait = one_request(client, url, model, prompt, max_tokens, tally, pass_start)
                time.sleep(min(wait, max(0.0, stop_at - time.perf_counter())))

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + CLIENT_TIMEOUT_S)
    return tally


def summary(label: str, tallies: list[Tally]) -> dict[str, object]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    outcomes = Counter[str]()
    for tally in tallies:
        outcomes.update(tally.outcomes)
    latencies = sorted(latency for tally in tallies for latency in tally.latencies_s)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    return {
        "label": label,
        "passes": len(tallies),
        "outcomes": dict(outcomes),
        "completed_per_pass": med([t.outcomes["completed"] for t in tallies]),
        "deadline_cut_per_pass": med([t.outcomes["deadline"] for t in tallies]),
        "refused_per_pass": med([t.outcomes["429"] for t in tallies]),
        "delivered_tokens_per_pass": med([t.delivered_tokens for t in tallies]),
        "lost_tokens_per_pass": med([t.lost_tokens for t in tallies]),
        "completed_p50_s": med(latencies),
        "completed_p99_s": p99,
        "failures": [f for t in tallies for f in t.failures][:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=10.0, help="server.request_timeout_s of both servers")
    parser.add_argument("--queue-wait", type=float, help="generation.max_queue_wait_s of the first server (default: its own default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["limited", "unlimited"], help="run one side (e.g. against a checkout without the setting)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    version = ModelRepository(args.state_dir / "models").serving_version(args.model)
    if version is None:
        raise SystemExit(f"{args.model} has no servable version in {args.state_dir}")
    common = {"APPLIANCE_REQUEST_TIMEOUT_S": str(args.deadline), "APPLIANCE_LOG_LEVEL": "warning",
              "APPLIANCE_GENERATION__PREFIX_CACHE": "false"}
    limited = dict(common)
    if args.queue_wait is not None:
        limited["APPLIANCE_GENERATION__MAX_QUEUE_WAIT_S"] = str(args.queue_wait)
    unlimited = {**common, "APPLIANCE_GENERATION__MAX_QUEUE_WAIT_S": str(args.deadline)}
    sides = {"queue wait limited": limited, "queue wait = deadline": unlimited}
    if args.only:
        sides = {"limited": {"queue wait limited": limited}, "unlimited": {"as configured": common}}[args.only]
    results: dict[str, list[Tally]] = {label: [] for label in sides}
    with tempfile.TemporaryDirectory(prefix="overload-") as work:
        for round_index in range(args.repeats):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for label in order:
                with PrivateServer(version, Path(work), extra_env=sides[label]) as server:
                    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as warm_up:
                        one_request(warm_up, server.url, args.model, "Say hello.", 8, Tally())
                    load = os.getloadavg()[0]
                    tally = run_pass(server.url, args.model, args.clients, args.seconds, args.max_tokens)
                    cut_at = f", cut ones sent at {statistics.median(tally.cut_sent_at_s):.1f} s (median)" if tally.cut_sent_at_s else ""
                    print(f"round {round_index + 1} {label}: {dict(tally.outcomes)} delivered {tally.delivered_tokens} "
                          f"tokens, lost {tally.lost_tokens}{cut_at} (load average before {load:.2f})", flush=True)
                    results[label].append(tally)
    report = [summary(label, tallies) for label, tallies in results.items()]
    print(f"\n{args.clients} streaming clients x {args.seconds:g} s, {args.max_tokens} tokens each, deadline {args.deadline:g} s, "
          f"{args.repeats} passes per side (medians per pass)")
    print("| server | completed | cut at the deadline | 429 | tokens delivered | tokens lost | completed p50 / p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in report:
        print(f"| {row['label']} | {row['completed_per_pass']:g} | {row['deadline_cut_per_pass']:g} | {row['refused_per_pass']:g} | "
              f"{row['delivered_tokens_per_pass']:g} | {row['lost_tokens_per_pass']:g} | "
              f"{row['completed_p50_s']:.1f} / {row['completed_p99_s']:.1f} |")
        if row["failures"]:
            print(f"  failures: {row['failures']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
