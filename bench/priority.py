"""Benchmark: interactive time to first token while a batch key saturates the box.

One run, one `appliance serve` process on loopback (SmolLM2-135M int4), two API keys: one with
`priority batch` that keeps `--batch-streams` streams of 256 tokens going (more than the
engine's 16 sequence slots, so batch work also waits in the queue), and the interactive one.
Time to first token of a short interactive chat (median of `--repeats`):

1. on the idle box;
2. under the batch load, the interactive key at priority interactive (admitted first);
3. under the same load, the interactive key switched to priority batch (plain arrival order:
   what the box did before priorities).

4. with `--batch-api-lines N`: while a Batch API batch of N chat lines (256 tokens each) of the
   batch key runs, with the interactive key back at priority interactive; also the batch's
   generated tokens per second during the measurement and on its own before it.

Target: (2) and (4) within 1.5x of (1). Interactive requests refused with 429 (they waited past
the queue limit) are counted, not timed.

    .venv/bin/python bench/priority.py --state-dir DIR [--batch-streams 32] [--repeats 15] [--batch-api-lines 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from serving_layer import free_port, machine  # noqa: E402

MODEL = "smollm2-135m-instruct"
BATCH_TOKENS = 256
#: Batch API scenario: time for the batch to fill the engine, and each throughput window.
BATCH_WARMUP_S = 10.0
BATCH_WINDOW_S = 40.0
INTERACTIVE_TOKENS = 8


def _key(state_dir: Path, name: str, priority: str) -> str:
    from appliance.config import load_settings
    from appliance.store.db import Database
    from appliance.store.keys import KeyStore
    from appliance.store.migrate import upgrade

    database = Database(load_settings(state_dir=state_dir).db_url)
    upgrade(database)
    store = KeyStore(database)
    try:
        store.revoke(name)
        store.find(name)
        name = f"{name}-{int(time.time())}"
    except Exception:  # noqa: BLE001 - a fresh state dir has no such key
        pass
    key, _ = store.create(name, ["infer"], priority=priority)
    database.close()
    return key


def _set_priority(state_dir: Path, key: str, priority: str) -> None:
    from appliance.config import load_settings
    from appliance.store.db import Database
    from appliance.store.keys import KeyStore

    database = Database(load_settings(state_dir=state_dir).db_url)
    store = KeyStore(database)
    prefix = key.split("_")[1]
    store.set_priority(store.find(prefix).name, priority)
    database.close()


async def _ttft(http: httpx.AsyncClient, url: str, key: str, max_tokens: int) -> float:
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Name three rivers in Europe."}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "ignore_eos": True,
    }
    started = time.monotonic()
    async with http.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        first = 0.0
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line and not first:
                first = time.monotonic() - started
        return first


def _batch_tokens(http: httpx.Client, url: str, key: str, batch_id: str) -> int:
    batch = http.get(f"{url}/v1/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}).json()
    return int(batch["usage"]["output_tokens"])


def _measure_under_batch_api(url: str, interactive: str, batch_key: str, lines: int, repeats: int) -> dict[str, float]:
    """Interactive TTFT while a Batch API batch runs, and the batch's tokens/s alone and beside it."""
    content = "".join(
        json.dumps(
            {
                "custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Write about river {n}."}], "max_tokens": BATCH_TOKENS, "ignore_eos": True},
            }
        )
        + "\n"
        for n in range(lines)
    )
    headers = {"Authorization": f"Bearer {batch_key}"}
    with httpx.Client(timeout=120) as http:
        upload = http.post(f"{url}/v1/files", headers=headers, files={"file": ("bench.jsonl", content.encode())}, data={"purpose": "batch"})
        upload.raise_for_status()
        created = http.post(
            f"{url}/v1/batches", headers=headers, json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"}
        )
        created.raise_for_status()
        batch_id = created.json()["id"]
        time.sleep(BATCH_WARMUP_S)  # the batch fills the engine
        start_tokens, started = _batch_tokens(http, url, batch_key, batch_id), time.monotonic()
        time.sleep(BATCH_WINDOW_S)
        alone = (_batch_tokens(http, url, batch_key, batch_id) - start_tokens) / (time.monotonic() - started)
        # Interactive requests for as long a window (tokens are counted as lines complete, so
        # a window shorter than a line's life would see none).
        start_tokens, started = _batch_tokens(http, url, batch_key, batch_id), time.monotonic()
        rounds = []
        while time.monotonic() - started < BATCH_WINDOW_S:
            rounds.append(asyncio.run(_measure(url, interactive, None, 0, repeats)))
        beside = (_batch_tokens(http, url, batch_key, batch_id) - start_tokens) / (time.monotonic() - started)
        result = rounds[0]
        http.post(f"{url}/v1/batches/{batch_id}/cancel", headers=headers).raise_for_status()
    return {**result, "batch_tokens_per_s_alone": alone, "batch_tokens_per_s_beside_interactive": beside}


async def _measure(url: str, interactive: str, batch: str | None, streams: int, repeats: int) -> dict[str, float]:
    """Median TTFT of the interactive requests that were admitted, and how many were refused (429)."""
    stop = asyncio.Event()

    async def batch_worker(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                await _ttft(http, url, batch, BATCH_TOKENS)  # type: ignore[arg-type]
            except httpx.HTTPError:
                await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=600) as http:
        workers = [asyncio.ensure_future(batch_worker(http)) for _ in range(streams if batch else 0)]
        await asyncio.sleep(5.0 if batch else 0.0)
        samples, refused = [], 0
        for _ in range(repeats):
            try:
                samples.append(await _ttft(http, url, interactive, INTERACTIVE_TOKENS))
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 429:
                    raise
                refused += 1
            await asyncio.sleep(0.3)
        stop.set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return {"ttft_ms": statistics.median(samples) * 1e3 if samples else float("nan"), "refused": refused, "admitted": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True, help="A state directory with SmolLM2 int4 exported.")
    parser.add_argument("--batch-streams", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-api-lines", type=int, default=0, help="Also measure beside a Batch API batch of this many lines.")
    args = parser.parse_args()
    interactive = _key(args.state_dir, "bench-interactive", "interactive")
    batch = _key(args.state_dir, "bench-batch", "batch")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STATE_DIR=str(args.state_dir), APPLIANCE_LOG_LEVEL="warning", APPLIANCE_REPOSITORY_POLL_S="0")
    server = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        print(f"machine: {machine()}")
        idle = asyncio.run(_measure(url, interactive, None, 0, args.repeats))
        prioritised = asyncio.run(_measure(url, interactive, batch, args.batch_streams, args.repeats))
        _set_priority(args.state_dir, interactive, "batch")
        time.sleep(3.0)  # the server's key cache
        arrival_order = asyncio.run(_measure(url, interactive, batch, args.batch_streams, args.repeats))
        batch_api = None
        if args.batch_api_lines:
            _set_priority(args.state_dir, interactive, "interactive")
            time.sleep(3.0)
            batch_api = _measure_under_batch_api(url, interactive, batch, args.batch_api_lines, args.repeats)
        print(
            json.dumps(
                {
                    "batch_streams": args.batch_streams,
                    "idle": idle,
                    "under_batch_interactive_priority": prioritised,
                    "under_batch_same_priority": arrival_order,
                    "ratio_to_idle": prioritised["ttft_ms"] / idle["ttft_ms"],
                    "under_batch_api": batch_api,
                    "batch_api_ratio_to_idle": batch_api["ttft_ms"] / idle["ttft_ms"] if batch_api else None,
                },
                indent=2,
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
