"""Benchmark: the appliance through Ray Serve against the single-box server, same machine, same
run, and what a replica killed with kill -9 costs.

Two servers at once on the same state directory (the default models: MiniLM int8 and SmolLM2
int4), each with the same ONNX Runtime threads per model:

- single box: `appliance serve` (one process: uvicorn, the ModelService, the engines);
- Ray: `appliance serve --ray auto` (a local Ray cluster: Ray Serve's HTTP proxy, unless the
  ingress is direct -> the ingress replica (the same app) -> one replica per model, each a
  process of its own).

Passes alternate between the two (after a warm-up): embeddings from 32 clients (one sentence a
request) and chat from 8 streams (64 tokens each, ignore_eos), as bench/serving_layer.py runs
them. Reports each side's median requests/s (tokens/s) and p50/p99 latency (TTFT) and the
ratio Ray / single box, the CPU each embedding request costs in each process (the single
box's one; Ray's proxy, ingress replica and embedder replica) and the CPU each chat token costs
(the single box; Ray's ingress and chat replica). Then, on the Ray server, the
embedder's replica is killed with kill -9 and the time until a new replica answers is measured
(`--restarts` times).

    .venv/bin/python bench/ray_overhead.py --state-dir DIR [--passes 3] [--restarts 3] [--ingress proxy|direct]
        [--stream-interval-tokens N] [--stream-interval-s S] [--json FILE]

`--ingress` sets the Ray server's `scale.ingress` (default: the setting's default): `proxy`
sends each request through Ray Serve's HTTP proxy, `direct` into the ingress replica itself.
`--stream-interval-tokens` and `--stream-interval-s` set its `scale.stream_interval_tokens`
and `scale.stream_interval_s` (how a busy chat replica groups a sequence's tokens into Ray
items; 1 token: every token its own item, as before the setting existed).

Differences under ~10% are noise on a shared 2-core box. On one box the Ray path pays its
hops (proxy, if any -> ingress -> replica, each a Ray actor call with its serialisation) out of the
same two cores that serve the models, so this is its worst case: across boxes the hops cost
network time, not the model's CPU.
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
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serving_layer import CHAT_MODEL, EMBED_MODEL, chat_load, embeddings_load, ensure_defaults, free_port, machine  # noqa: E402

EMBED_SECONDS = 10.0
CHAT_SECONDS = 15.0
READY_TIMEOUT_S = 600.0
#: The Ray processes whose CPU per embedding request is reported, by the start of their title
#: (Ray names its workers `ray::CLASS`, Serve's replicas `ray::ServeReplica:APP:DEPLOYMENT`).
RAY_PARTS = {
    "proxy": "ray::ProxyActor",
    "ingress": "ray::ServeReplica:appliance:ingress",
    "embedder": f"ray::ServeReplica:appliance:model-{EMBED_MODEL}",
}
#: The Ray processes whose CPU per chat token is reported (a token crosses the ingress and the
#: chat model's replica; the proxy as well with `--ingress proxy`).
RAY_CHAT_PARTS = {
    "proxy": RAY_PARTS["proxy"],
    "ingress": RAY_PARTS["ingress"],
    "chat": f"ray::ServeReplica:appliance:model-{CHAT_MODEL}",
}


class Server:
    """`appliance serve [--ray auto]` on a free port, auth off (loopback), until closed."""

    def __init__(self, state_dir: Path, *, ray: bool, threads: int, log: Path, scale: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray = ray
        command = [sys.executable, "-m", "appliance", "serve", "--no-auth", "--port", str(self.port)]
        if ray:
            command += ["--ray", "auto"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(APPLIANCE_STATE_DIR=str(state_dir), APPLIANCE_CPU_THREADS=str(threads), APPLIANCE_REPOSITORY_POLL_S="0")
        env.update({f"APPLIANCE_SCALE__{key.upper()}": value for key, value in (scale or {}).items()})
        self.log = log.open("w")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become ready")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def replica_pids(deployment: str) -> list[int]:
    title = f"ray::ServeReplica:appliance:{deployment}"
    return sorted(
        p.info["pid"] for p in psutil.process_iter(["pid", "cmdline", "status"])
        if (p.info.get("cmdline") or [""])[0].startswith(title) and p.info.get("status") != psutil.STATUS_ZOMBIE
    )


def restart_seconds(url: str) -> float:
    """kill -9 the embedder's only replica; seconds until an embedding is answered again."""
    [victim] = replica_pids(f"model-{EMBED_MODEL}")
    body = {"model": EMBED_MODEL, "input": "The quick brown fox."}
    psutil.Process(victim).kill()
    killed = time.monotonic()
    with httpx.Client(timeout=30) as client:
        while time.monotonic() - killed < 300:
            if client.post(url + "/v1/embeddings", json=body).status_code == 200 and replica_pids(f"model-{EMBED_MODEL}") not in ([], [victim]):
                return time.monotonic() - killed
            time.sleep(0.1)
    raise TimeoutError("the replica did not come back within 300 s")


def cpu_seconds(server: Server, parts: dict[str, str]) -> dict[str, float]:
    """CPU seconds each of `parts` of `server` has used so far (the single box: its one process)."""
    if not server.ray:
        times = psutil.Process(server.proc.pid).cpu_times()
        return {"server": times.user + times.system}
    totals = dict.fromkeys(parts, 0.0)
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        title, times = (process.info.get("cmdline") or [""])[0], process.info.get("cpu_times")
        for part, prefix in parts.items():
            if times is not None and title.startswith(prefix):
                totals[part] += times.user + times.system
    return totals


def embeddings_pass(server: Server) -> dict[str, float]:
    """One embeddings load, with the CPU milliseconds per request of each part of the server."""
    before = cpu_seconds(server, RAY_PARTS)
    figures = asyncio.run(embeddings_load(server.url, EMBED_SECONDS))
    used = {part: seconds - before[part] for part, seconds in cpu_seconds(server, RAY_PARTS).items()}
    requests = figures["requests_per_s"] * EMBED_SECONDS
    return {**figures, **{f"cpu_ms_{part}": 1000 * seconds / requests for part, seconds in used.items()}}


def chat_pass(server: Server) -> dict[str, float]:
    """One chat load, with the CPU milliseconds per generated token of each part of the server."""
    before = cpu_seconds(server, RAY_CHAT_PARTS)
    started = time.perf_counter()
    figures = asyncio.run(chat_load(server.url, CHAT_SECONDS))
    tokens = figures["tokens_per_s"] * (time.perf_counter() - started)
    used = {part: seconds - before[part] for part, seconds in cpu_seconds(server, RAY_CHAT_PARTS).items()}
    return {**figures, **{f"cpu_ms_{part}": 1000 * seconds / tokens for part, seconds in used.items()}}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per model, both servers")
    parser.add_argument("--ingress", choices=("proxy", "direct"), help="the Ray server's scale.ingress (default: the setting's)")
    parser.add_argument("--stream-interval-tokens", type=int, help="the Ray server's scale.stream_interval_tokens")
    parser.add_argument("--stream-interval-s", type=float, help="the Ray server's scale.stream_interval_s")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scale = {
        key: str(value)
        for key, value in (
            ("ingress", args.ingress),
            ("stream_interval_tokens", args.stream_interval_tokens),
            ("stream_interval_s", args.stream_interval_s),
        )
        if value is not None
    }
    ensure_defaults(args.state_dir)
    print(f"machine: {machine()}", flush=True)
    logs = args.state_dir / "bench-logs"
    logs.mkdir(exist_ok=True)
    single = Server(args.state_dir, ray=False, threads=args.threads, log=logs / "single.log")
    ray = Server(args.state_dir, ray=True, threads=args.threads, log=logs / "ray.log", scale=scale)
    servers = {"single": single, "ray": ray}
    results: dict[str, dict[str, list[dict[str, float]]]] = {name: {"embeddings": [], "chat": []} for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up
            asyncio.run(embeddings_load(server.url, 3.0))
            asyncio.run(chat_load(server.url, 5.0))
        for index in range(args.passes):
            order = list(servers.items()) if index % 2 == 0 else list(reversed(servers.items()))
            for name, server in order:
                results[name]["embeddings"].append(embeddings_pass(server))
                results[name]["chat"].append(chat_pass(server))
                print(f"pass {index + 1} {name}: {results[name]['embeddings'][-1]} {results[name]['chat'][-1]}", flush=True)
        single.close()  # the restart measure runs with the Ray server alone
        restarts = [restart_seconds(ray.url) for _ in range(args.restarts)]
    finally:
        for server in servers.values():
            server.close()
    figures: dict[str, Any] = {name: {workload: summary(runs) for workload, runs in per.items()} for name, per in results.items()}
    figures["restart_s"] = restarts
    print(f"\nmachine: {machine()}; {args.passes} alternating passes, medians; Ray settings: {scale or 'defaults'}")
    print("| workload | single box | Ray Serve | Ray / single |")
    print("| --- | --- | --- | --- |")
    for workload, key, unit in (
        ("embeddings, 32 clients", "requests_per_s", "req/s"),
        ("embeddings p50", "p50_ms", "ms"),
        ("embeddings p99", "p99_ms", "ms"),
        ("chat, 8 streams", "tokens_per_s", "tok/s"),
        ("chat TTFT p50", "ttft_p50_ms", "ms"),
    ):
        family = "embeddings" if workload.startswith("embeddings") else "chat"
        a, b = figures["single"][family][key], figures["ray"][family][key]
        print(f"| {workload} | {a:.1f} {unit} | {b:.1f} {unit} | {b / a:.2f} |")
    for family, what, digits in (("embeddings", "embedding request", 1), ("chat", "chat token", 2)):
        cpu = {name: {key[len("cpu_ms_"):]: value for key, value in figures[name][family].items() if key.startswith("cpu_ms_")}
               for name in servers}
        print(f"CPU per {what}: " + "; ".join(
            f"{name}: " + ", ".join(f"{part} {ms:.{digits}f} ms" for part, ms in parts.items()) for name, parts in cpu.items()
        ))
    print(f"replica restart after kill -9 (until it answers): {', '.join(f'{s:.1f}' for s in restarts)} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
