"""Benchmark: what the serving layer costs and what a cold model costs, on the default models.

All in one run, same machine, servers as separate `appliance serve` processes on loopback:

1. Cold against warm (this tree): time to the first token of a streamed SmolLM2 int4
   completion, and to the whole answer of a MiniLM int8 embedding, first on a loaded model,
   then on the same model right after it was evicted (a request with `keep_alive: 0` unloads
   it; the next one loads it again). Median of `--repeats`.
2. The warm path before and after the serving layer: the same load against a server built
   from `--baseline` (a git revision before the serving layer, default the commit before it)
   and against this tree, passes alternating: embeddings from 32 clients (one sentence a
   request) and chat from 8 streams (64 tokens each). Reports each side's median and the
   ratio; differences under ~10% are noise on a shared 2-core box.
3. Event-loop stalls, before and after: while two clients send 7.5 MB prompts (a chat of
   eight ~940 KB messages, a completion of one 7.5 MB string) for `STALL_SECONDS`, a third
   pings `/v2/health/live` every 50 ms; the worst and the 99th-percentile ping are reported.

    .venv/bin/python bench/serving_layer.py [--state-dir DIR] [--repeats 5] [--passes 3] [--baseline REV]

The baseline server runs from `git archive` of the revision, assembled in the installed layout
(`appliance/{export,kernels,admin}`) in a temporary folder, with this venv's packages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
#: The last commit before the serving layer.
DEFAULT_BASELINE = "a7efe7f"
EMBED_CLIENTS = 32
CHAT_STREAMS = 8
CHAT_TOKENS = 64
EMBED_SECONDS = 10.0
CHAT_SECONDS = 15.0
MAPPED = ("export", "kernels", "admin")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
HUGE_PROMPT_BYTES = 7_500_000
STALL_SECONDS = 20.0
PING_INTERVAL_S = 0.05


def machine() -> str:
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                flags = " ".join(flag for flag in line.split(":", 1)[1].split() if flag in wanted)
    except OSError:
        pass
    return f"{model} ({flags or 'no AVX2'}), {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_defaults(state_dir: Path) -> None:
    """Export the embedded default models into `state_dir` unless they are there."""
    if (state_dir / "models" / CHAT_MODEL).is_dir() and (state_dir / "models" / EMBED_MODEL).is_dir():
        return
    print(f"exporting the default models into {state_dir} ...", flush=True)
    subprocess.run([sys.executable, "-m", "appliance", "export", "--defaults", "--state-dir", str(state_dir)], cwd=ROOT, check=True)


def baseline_tree(revision: str, target: Path) -> Path:
    """`revision` of this repository, laid out as the installed package (for PYTHONPATH)."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=ROOT, check=True, capture_output=True).stdout
    source = target / "source"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = target / "layout"
    shutil.copytree(source / "appliance", package / "appliance")
    for folder in MAPPED:
        shutil.copytree(source / folder, package / "appliance" / folder)
    return package


class Server:
    """`appliance serve` in a subprocess; `pythonpath` runs another tree's code."""

    def __init__(self, state_dir: Path, *, pythonpath: Path | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            APPLIANCE_STATE_DIR=str(state_dir), APPLIANCE_LOG_LEVEL="warning", APPLIANCE_REPOSITORY_POLL_S="0",
            APPLIANCE_BATCHING__MAX_QUEUE_SIZE="4096", **(extra_env or {}),
        )
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(self.port), "--no-auth"],
            cwd=pythonpath or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- cold against warm -------------------------------------------------------------------------
def first_token_s(client: httpx.Client, body: dict[str, Any]) -> tuple[float, float]:
    """(time to the first token, time to the whole answer) of one streamed completion."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        for line in stream.iter_lines():
            if first is None and line.startswith("data: {") and '"text":""' not in line:
                first = time.perf_counter() - started
    assert first is not None, "no token came back"
    return first, time.perf_counter() - started


def embed_s(client: httpx.Client, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post("/v1/embeddings", json=body)
    response.raise_for_status()
    return time.perf_counter() - started


def wait_evicted(client: httpx.Client, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entry = next(e for e in client.post("/v2/repository/index").json() if e["name"] == name)
        if entry["state"] != "READY":
            return
        time.sleep(0.05)
    raise TimeoutError(f"{name} was not evicted")


def cold_and_warm(state_dir: Path, repeats: int) -> dict[str, dict[str, float]]:
    chat = {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    embed = {"model": EMBED_MODEL, "input": SENTENCE}
    figures: dict[str, list[float]] = {"chat_ttft_warm": [], "chat_ttft_cold": [], "chat_answer_cold": [], "embed_warm": [], "embed_cold": []}
    with Server(state_dir) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        for _ in range(2):  # warm-up
            first_token_s(client, chat)
            embed_s(client, embed)
        for _ in range(repeats):
            figures["chat_ttft_warm"].append(first_token_s(client, chat)[0])
            figures["embed_warm"].append(embed_s(client, embed))
            first_token_s(client, {**chat, "max_tokens": 1, "keep_alive": 0})
            embed_s(client, {**embed, "keep_alive": 0})
            wait_evicted(client, CHAT_MODEL)
            wait_evicted(client, EMBED_MODEL)
            ttft, answer = first_token_s(client, chat)
            figures["chat_ttft_cold"].append(ttft)
            figures["chat_answer_cold"].append(answer)
            figures["embed_cold"].append(embed_s(client, embed))
        metrics = client.get("/metrics").text
    loads = [line for line in metrics.splitlines() if line.startswith("appliance_model_load_seconds_sum")]
    return {
        "median_s": {key: statistics.median(values) for key, values in figures.items()},
        "load_seconds_sum": {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in loads},
    }


# -- warm path, before and after ---------------------------------------------------------------
async def embeddings_load(url: str, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            response = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": SENTENCE, "encoding_format": "base64"})
            if response.status_code != 200:
                errors += 1
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=EMBED_CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(EMBED_CLIENTS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "errors": float(errors),
    }


async def chat_load(url: str, seconds: float) -> dict[str, float]:
    tokens = 0
    ttfts: list[float] = []
    stop = time.perf_counter() + seconds
    body = {"model": CHAT_MODEL, "prompt": "Tell me about the sea.", "max_tokens": CHAT_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def stream(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.perf_counter() < stop:
            started = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {") and '"text":""' not in line:
                        first = time.perf_counter() - started
                    if '"usage":{' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]
            if first is not None:
                ttfts.append(first)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(stream(client) for _ in range(CHAT_STREAMS)))
        elapsed = time.perf_counter() - started
    ttfts.sort()
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2]}


async def loop_stalls(url: str, seconds: float) -> dict[str, float]:
    """Health-ping latencies while huge prompts arrive (the server must refuse or tokenise
    them without stalling everyone else)."""
    text = "word " * (HUGE_PROMPT_BYTES // 5)
    chat = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text[: HUGE_PROMPT_BYTES // 8]}] * 8}
    completion = {"model": CHAT_MODEL, "prompt": text}
    stop = time.perf_counter() + seconds
    pings: list[float] = []
    statuses: list[int] = []

    async def sender(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        while time.perf_counter() < stop:
            statuses.append((await client.post(path, json=body)).status_code)

    async def pinger(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await client.get("/v2/health/live")
            pings.append(time.perf_counter() - started)
            await asyncio.sleep(PING_INTERVAL_S)

    async with httpx.AsyncClient(base_url=url, timeout=120) as senders, httpx.AsyncClient(base_url=url, timeout=120) as health:
        await asyncio.gather(sender(senders, "/v1/chat/completions", chat), sender(senders, "/v1/completions", completion), pinger(health))
    pings.sort()
    return {
        "ping_max_ms": 1000 * pings[-1],
        "ping_p99_ms": 1000 * pings[min(len(pings) - 1, int(len(pings) * 0.99))],
        "pings": float(len(pings)),
        "huge_requests": float(len(statuses)),
        "huge_refused_400": float(sum(1 for status in statuses if status == 400)),
    }


def stalls(state_dir: Path, baseline: Path) -> dict[str, dict[str, float]]:
    figures = {}
    for side in ("baseline", "serving"):
        with Server(state_dir / f"state-{side}", pythonpath=baseline if side == "baseline" else None) as server:
            figures[side] = asyncio.run(loop_stalls(server.url, STALL_SECONDS))
        print(f"stalls {side}: {figures[side]}", flush=True)
    return figures


def warm_path(state_dir: Path, baseline: Path, passes: int) -> dict[str, Any]:
    """Alternate passes against the baseline and this tree; medians per side."""
    sides: dict[str, list[dict[str, float]]] = {"baseline": [], "serving": []}
    for index in range(passes):
        for side in (("baseline", "serving") if index % 2 == 0 else ("serving", "baseline")):
            side_state = state_dir / f"state-{side}"
            with Server(side_state, pythonpath=baseline if side == "baseline" else None) as server:
                asyncio.run(embeddings_load(server.url, 2.0))  # warm-up
                asyncio.run(chat_load(server.url, 3.0))
                embed = asyncio.run(embeddings_load(server.url, EMBED_SECONDS))
                chat = asyncio.run(chat_load(server.url, CHAT_SECONDS))
            sides[side].append({**{f"embed_{k}": v for k, v in embed.items()}, **{f"chat_{k}": v for k, v in chat.items()}})
            print(f"pass {index + 1} {side}: {sides[side][-1]}", flush=True)
    medians = {side: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for side, runs in sides.items()}
    ratios = {key: medians["serving"][key] / medians["baseline"][key] for key in medians["serving"] if medians["baseline"][key]}
    return {"medians": medians, "serving_over_baseline": ratios, "passes": sides}


def side_states(models_state: Path, work: Path) -> None:
    """One state folder per side with the same model files (hard links), separate databases."""
    for side in ("baseline", "serving"):
        target = work / f"state-{side}" / "models"
        if not target.exists():
            shutil.copytree(models_state / "models", target, copy_function=os.link, ignore=shutil.ignore_patterns(".staging", ".lock"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=ROOT / "state" / "bench-serving")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ensure_defaults(args.state_dir)
    print(f"machine: {machine()}", flush=True)
    result: dict[str, Any] = {"machine": machine()}
    result["cold_and_warm"] = cold_and_warm(args.state_dir, args.repeats)
    print(json.dumps(result["cold_and_warm"], indent=2), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        side_states(args.state_dir, work)
        baseline = baseline_tree(args.baseline, work / "baseline")
        result["stalls"] = stalls(work, baseline)
        result["warm_path"] = warm_path(work, baseline, args.passes)
    print(json.dumps({k: result["warm_path"][k] for k in ("medians", "serving_over_baseline")}, indent=2))
    print(json.dumps(result["stalls"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
