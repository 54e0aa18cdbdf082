"""Benchmark: the appliance against llama.cpp at the sizes users run (issue 18): 0.5B-1.5B
decoders, 2,000-token prompts, 8 and 32 streams, and the box's memory-bandwidth limit.

A bench tool: never imported by the appliance, never imports llama_cpp itself (llama.cpp runs
in bench/llamacpp_worker.py in its own venv), never downloads anything (the models are random
weights in published shapes, bench/gguf_shapes.py).

Everything in one invocation, same machine, same thread count, both sides alive at once and
measured alternately (appliance pass, llama.cpp pass, ...), each figure the median of
`--repeats` quiet-gated passes after one warm-up pass per workload:

0. the box: CPU model and flags, and its memory-bandwidth limit: a streaming read (numpy `max`
   over a uint64 buffer of max(1 GiB, 32 x L3)) with 1 thread and with `--threads` threads;
1. benchmark files: `bench/gguf_shapes.py` writes the shape's GGUF in each file type the pairs
   name (seeded random weights in the published shapes; cached beside a JSON sidecar);
2. the appliance's variants: `appliance export FILE.gguf --name bench-SHAPE-TYPE --quant QUANT
   --force` into WORK/state (`--force`: random weights, the quality gate is not the point),
   skipped when a version of that name and variant exported from the same file (sha256) is
   there (`--fresh-export`: export anyway, e.g. after a recipe changed); the export's per-stage seconds come from its report.json;
3. for each pair (default: int4 from the Q4_0 file, int8 from the Q8_0 file), the appliance
   (`appliance serve` on a private state dir: prefix cache and speculation off, chunked prefill
   at `--prefill-chunk-tokens`, max running sequences >= the largest stream count; requests
   through HTTP `/v1/completions` streaming, prompts as token ids, `ignore_eos`) against
   llama.cpp on the same file (llama-cpp-python's C API in bench/.venv-llamacpp, driven like
   llama-server's parallel slots: bench/llamacpp_worker.py; flash attention auto, n_batch 2048,
   n_ubatch 512, f16 KV, as llama.cpp's defaults):
   * single stream, 128 new tokens, greedy, EOS ignored, after a 100-token and after a
     2,000-token prompt: time to first token and decode tokens/s (tokens 2..128), inter-token
     latency p50/p99;
   * time to first token for a 500-token prompt (and the 2,000 one from the run above);
   * 8 and 32 concurrent streams (different 100-token prompts, 128 new tokens each): aggregate
     tokens/s end to end (first request sent to last token) and in the decode phase (after every
     stream's first token), time to first token (median), inter-token latency p50/p99;
   * KV bytes per token (appliance: the manifest's KV dtype; llama.cpp: f16, and its own
     `llama_state_seq_get_size` after the 2,000-token run) and how many 2,000-token sequences
     fit in 8 GiB;
   * bytes read per generated token (the weights a decode step reads: every tensor but
     row-lookup tables, MatMulNBits weights counted as ONNX Runtime's CPU kernel packs them,
     bench/mlas_packing.py; plus the KV of the context) and each single-stream decode figure as
     a fraction of the measured bandwidth: tokens/s x bytes/token / bytes/s; the appliance's
     stored bytes beside them;
   * resident memory of each side's process after its runs;
   * the compute ceiling (bench/compute_limit.py, quiet-gated probes before the servers start
     and after they stop, the faster per matrix counting: a slow spell of the host lowers one): the
     version's weight matrices timed alone at the streams' rows and a prefill chunk's, as the
     most tokens/s the stream runs could reach, the least 32-row step and the least 2,000-token
     first token on this box, with each measured figure and llama.cpp's beside them.
4. `--chunk-sweep 128,256,512,1024`: the first pair's appliance TTFT for the 2,000-token prompt
   at each chunked-prefill size (one server per size), to tune and state it.

Token ids: both sides get the same prompt ids, drawn (seeded) from the file's NORMAL tokens,
after the BOS id when the file says to add one; nobody tokenises text, so a tokenizer
difference cannot change the workload.

Inter-token latency: the gaps between output-carrying stream chunks (vLLM's definition, as
appliance.benchmark.stats); the appliance may send one chunk for two tokens when the first
ends inside a UTF-8 character (random weights emit byte tokens now and then), so the JSON
keeps chunks and tokens per run. llama.cpp's gaps are its token times.

Quiet gating: before each pass the script waits (up to `--quiet-wait-s`) until other processes
use under `--max-foreign` of the machine, measures the CPU they used during the pass
(llm_vs_llamacpp.ForeignLoad; the idle side of the pair counts as foreign), and repeats a pass
that exceeds it (up to `--max-tries`, then keeps the quietest and marks it ungated). The JSON
keeps every pass's foreign share. Results are written after every pair.

Duration: not yet measured; estimated for the 2-core box from SmolLM2-360M's figures (issue
18), per shape with both pairs and 3 repeats: 0.5B ~40 min, 1.5B ~2 h, plus the exports (the
issue's target for a 1.5B export is 15 min per variant) and any wait for quiet. The single
2,000-token prefills and the 32-stream passes dominate. Memory: the export dequantises to fp32
(1.5B: ~6 GB plus copies); a pair's two processes hold their weights and KV (1.5B Q8_0: ~4 GB).

Also measured, for the record: the Python HTTP client shares the cores with the appliance's
server during its passes (it is part of "end to end"); llama.cpp runs in-process, no HTTP.
`decode_tok_s` of the stream runs is the project's definition (concurrent_stream_figures);
`decode_tok_s_counted` counts only the tokens timed after every stream's first token.

    .venv/bin/python bench/llm_vs_llamacpp.py --setup      # once: llama-cpp-python 0.3.36 in bench/.venv-llamacpp
    .venv/bin/python bench/llm_sizes_vs_llamacpp.py --shape qwen2.5-0.5b --json bench/.work/sizes/qwen2.5-0.5b.json
    .venv/bin/python bench/llm_sizes_vs_llamacpp.py --shape qwen2.5-1.5b --chunk-sweep 128,256,512,1024 --json bench/.work/sizes/qwen2.5-1.5b.json
    .venv/bin/python bench/llm_sizes_vs_llamacpp.py --shape llama3.2-1b --json bench/.work/sizes/llama3.2-1b.json
    # options: --pair Q4_K_M:int4 (repeatable; FILE.gguf:QUANT for your own file), --threads N,
    # --repeats 3, --chunk-sweep 128,256,512,1024, --export-only, --fresh-export, --jobs decode_after_100, --skip-llamacpp
    # smoke test (seconds to a minute, no llama.cpp needed):
    .venv/bin/python bench/llm_sizes_vs_llamacpp.py --shape tiny --skip-llamacpp --no-gate --repeats 1 --bandwidth-mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(BENCH))  # the sibling scripts, after every package so none is shadowed

import compute_limit  # noqa: E402
import gguf_shapes  # noqa: E402
from llm_vs_llamacpp import LLAMA_PYTHON, ForeignLoad, machine  # noqa: E402
from mlas_packing import INT8_COMPUTE_ACCURACY_LEVEL, packed_bytes  # noqa: E402

from appliance.benchmark.serverproc import PrivateServer  # noqa: E402
from appliance.benchmark.stats import StreamTiming, concurrent_stream_figures, percentile  # noqa: E402

DEFAULT_WORK = BENCH / ".work" / "sizes"
DEFAULT_PAIRS = ("Q4_0:int4", "Q8_0:int8")
NEW_TOKENS = 128
DECODE_PROMPTS = (100, 2000)
TTFT_PROMPTS = (500,)
STREAM_COUNTS = (8, 32)
STREAM_PROMPT = 100
#: Tokens the warm-up pass of each workload generates (enough to run the decode shapes).
WARMUP_TOKENS = 8
KV_BUDGET_BYTES = 8 * 2**30
KV_SEQUENCE_TOKENS = 2000
#: Timed runs per matrix and row count of the compute ceiling (compute_limit.py; the fastest counts).
COMPUTE_LIMIT_RUNS = 5
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
LLAMA_KV_BYTES = 2  # llama.cpp's default f16 K and V cache
WORKER = BENCH / "llamacpp_worker.py"


# -- the box ------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def l3_bytes() -> int:
    """The largest last-level cache any CPU reports (sysfs), 32 MiB when unknown."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu").glob("cpu*/cache/index*"):
        try:
            if (entry / "level").read_text().strip() != "3":
                continue
            text = (entry / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def stream_read_gbps(buffer: np.ndarray, threads: int, sweeps: int = 3) -> float:
    """GB/s of `threads` threads each streaming through its share of `buffer` (numpy's max
    releases the GIL and reads at memory speed: 33 GB/s on the 2-core EPYC, vs 17 for sum)."""
    parts = np.array_split(buffer, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))
        started = time.perf_counter()
        for _ in range(sweeps):
            list(pool.map(np.max, parts))
        elapsed = time.perf_counter() - started
    return buffer.nbytes * sweeps / elapsed / 1e9


# -- quiet gating -------------------------------------------------------------------------


@dataclass
class Gate:
    """Wait for quiet, measure foreign CPU during a pass, repeat a noisy one."""

    max_foreign: float
    quiet_wait_s: float
    max_tries: int
    enabled: bool = True

    def wait_quiet(self, own: set[int]) -> float:
        deadline = time.monotonic() + self.quiet_wait_s
        while True:
            with ForeignLoad(own) as load:
                time.sleep(1.0)
            if load.foreign_share <= self.max_foreign or time.monotonic() > deadline:
                return load.foreign_share
            time.sleep(1.0)

    def run(self, own: set[int], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`work()`'s figures plus foreign_cpu_share, tries and gated (quiet enough or not)."""
        best: dict[str, Any] | None = None
        tries = self.max_tries if self.enabled else 1
        for attempt in range(1, tries + 1):
            if self.enabled:
                self.wait_quiet(own)
            with ForeignLoad(own) as load:
                figures = work()
            figures.update(foreign_cpu_share=round(load.foreign_share, 4), tries=attempt)
            figures["gated"] = self.enabled and load.foreign_share <= self.max_foreign
            if figures["gated"] or not self.enabled:
                return figures
            if best is None or figures["foreign_cpu_share"] < best["foreign_cpu_share"]:
                best = figures
        assert best is not None
        return best


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """The quiet gate's options (Gate's fields), shared by the scripts that reuse this one's gate."""
    parser.add_argument("--max-foreign", type=float, default=0.05, help="largest share of the machine other processes may use")
    parser.add_argument("--quiet-wait-s", type=float, default=120.0)
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--no-gate", action="store_true", help="measure foreign load but never wait or repeat (smoke tests)")


def medians(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the passes; the passes' foreign shares kept."""
    keys = dict.fromkeys(k for p in passes for k, v in p.items() if isinstance(v, int | float) and not isinstance(v, bool))
    out: dict[str, Any] = {key: statistics.median(p[key] for p in passes if p.get(key) is not None) for key in keys}
    out["foreign_cpu_shares"] = [p["foreign_cpu_share"] for p in passes]
    out["all_gated"] = all(p["gated"] for p in passes)
    out["passes"] = len(passes)
    return out


# -- workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    """The prompts (token ids) both sides get."""

    decode: dict[int, list[int]]
    ttft: dict[int, list[int]]
    streams: dict[int, list[list[int]]]


def prompt_ids(gguf_file: Path, seed: int) -> Workload:
    """Seeded prompts of NORMAL tokens from the file's vocabulary, after BOS when it adds one."""
    from appliance.export.llm.gguf_header import read_gguf_header

    meta = read_gguf_header(gguf_file).metadata
    types = meta.get("tokenizer.ggml.token_type") or []
    normal = [index for index, kind in enumerate(types) if kind == 1] or list(range(len(meta["tokenizer.ggml.tokens"])))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None

    def ids(length: int, key: int) -> list[int]:
        rng = random.Random(seed * 1_000_003 + key)
        body = [normal[rng.randrange(len(normal))] for _ in range(length - (1 if add_bos else 0))]
        return [int(bos), *body] if add_bos else body

    return Workload(
        decode={length: ids(length, length) for length in DECODE_PROMPTS},
        ttft={length: ids(length, 10_000 + length) for length in TTFT_PROMPTS},
        streams={count: [ids(STREAM_PROMPT, 100_000 * count + index) for index in range(count)] for count in STREAM_COUNTS},
    )


@dataclass
class StreamRun:
    """One stream as either side saw it: seconds from the pass start."""

    first_s: float
    last_s: float
    tokens: int
    chunk_times_s: list[float] = field(default_factory=list)


def single_figures(run: StreamRun) -> dict[str, Any]:
    gaps = [b - a for a, b in zip(run.chunk_times_s, run.chunk_times_s[1:])]
    return {
        "ttft_s": run.first_s,
        "decode_tok_s": (run.tokens - 1) / (run.last_s - run.first_s) if run.last_s > run.first_s else None,
        "itl_p50_s": percentile(gaps, 50) if gaps else None,
        "itl_p99_s": percentile(gaps, 99) if gaps else None,
        "tokens": run.tokens,
        "chunks": len(run.chunk_times_s),
    }


def streams_figures(runs: list[StreamRun]) -> dict[str, Any]:
    """concurrent_stream_figures (the project's definitions, comparable with earlier figures),
    plus `decode_tok_s_counted`: the tokens actually timed after every stream's first token,
    over that window. The project's `decode_tok_s` counts all tokens but the first of each
    stream, which overstates an engine that decodes early streams while later ones prefill."""
    gaps = [b - a for run in runs for a, b in zip(run.chunk_times_s, run.chunk_times_s[1:])]
    decode_start = max(run.first_s for run in runs)
    end = max(run.last_s for run in runs)
    after = sum(
        sum(1 for t in run.chunk_times_s if t > decode_start) * run.tokens / max(len(run.chunk_times_s), 1) for run in runs
    )
    return {
        **concurrent_stream_figures([StreamTiming(run.first_s, run.last_s, run.tokens) for run in runs]),
        "decode_tok_s_counted": after / (end - decode_start) if end > decode_start else None,
        "ttft_max_s": decode_start,
        "itl_p50_s": percentile(gaps, 50) if gaps else None,
        "itl_p99_s": percentile(gaps, 99) if gaps else None,
        "tokens": sum(run.tokens for run in runs),
        "chunks": sum(len(run.chunk_times_s) for run in runs),
    }


# -- the appliance side -------------------------------------------------------------------


class ApplianceSide:
    """`appliance serve` for one exported version, driven through /v1/completions."""

    name = "appliance"

    def __init__(  # noqa: ANN401 - ModelVersion
        self, version: Any, work: Path, threads: int, max_streams: int, chunk_tokens: int, extra_env: dict[str, str] | None = None,
        companions: tuple[Any, ...] = (),
    ) -> None:
        """`extra_env`: more settings for the server (APPLIANCE_... variables), over these;
        `companions`: other versions of the model linked beside it (a speculation draft)."""
        self.model = version.name
        env = {
            "APPLIANCE_CPU_THREADS": str(threads),
            "APPLIANCE_LOG_LEVEL": "warning",
            "APPLIANCE_REQUEST_TIMEOUT_S": "3600",
            # The warm-up sends the measured prompts: without this TTFT would be a cache hit.
            "APPLIANCE_GENERATION__PREFIX_CACHE": "false",
            "APPLIANCE_GENERATION__SPECULATIVE": "off",
            "APPLIANCE_GENERATION__MAX_RUNNING_SEQUENCES": str(max(max_streams, 1)),
            "APPLIANCE_GENERATION__PREFILL_CHUNK_TOKENS": str(chunk_tokens),
            **(extra_env or {}),
        }
        self.server = PrivateServer(version, work / "servers", extra_env=env, companions=companions)

    def __enter__(self) -> ApplianceSide:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(None, None, None)

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def rss_bytes(self) -> int:
        return _tree_rss(self.pid)

    async def _stream(self, client: httpx.AsyncClient, ids: list[int], max_tokens: int, start: float) -> StreamRun:
        body = {
            "model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }
        times: list[float] = []
        tokens = 0
        async with client.stream("POST", self.server.url + "/v1/completions", json=body, timeout=3600) as response:
            if response.status_code != 200:
                raise RuntimeError(f"appliance answered {response.status_code}: {(await response.aread())[:500]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    raise RuntimeError(f"appliance stream error: {payload['error']}")
                if payload.get("usage"):
                    tokens = payload["usage"]["completion_tokens"]
                # A chunk is sent at a token event that has text or ends the answer: a token that
                # ends inside a UTF-8 character waits for the next one (max_tokens 1 still gets
                # its finish chunk).
                if any(choice.get("text") or choice.get("finish_reason") for choice in payload.get("choices", [])):
                    times.append(time.perf_counter() - start)
        if not times:
            raise RuntimeError("appliance stream carried no output")
        return StreamRun(times[0], times[-1], tokens or len(times), times)

    async def _many(self, prompts: list[list[int]], max_tokens: int) -> list[StreamRun]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
            start = time.perf_counter()
            return await asyncio.gather(*[self._stream(client, ids, max_tokens, start) for ids in prompts])

    def single(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        return single_figures(asyncio.run(self._many([ids], new_tokens))[0])

    def streams(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        return streams_figures(asyncio.run(self._many(prompts, new_tokens)))


# -- the llama.cpp side -------------------------------------------------------------------


class LlamaSide:
    """bench/llamacpp_worker.py on one GGUF file in bench/.venv-llamacpp."""

    name = "llama.cpp"

    def __init__(self, gguf_file: Path, work: Path, threads: int, args: argparse.Namespace) -> None:
        self.argv = [
            str(LLAMA_PYTHON), str(WORKER), str(gguf_file), str(threads), args.llama_flash_attn,
            str(args.llama_n_batch), str(args.llama_n_ubatch), "1" if args.llama_kv_unified else "0",
        ]
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = work / "logs" / f"llamacpp-{gguf_file.stem}.log"
        self.facts: dict[str, Any] = {}

    def __enter__(self) -> LlamaSide:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the worker writes it until it exits
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.facts = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        return _tree_rss(self.pid)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"llama.cpp worker exited: {self.log_path.read_text()[-2000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp worker: {answer['error']}\n{answer.get('traceback', '')}")
        return answer

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def single(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        answer = self._ask({"op": "single", "ids": ids, "new_tokens": new_tokens})
        times = answer["token_times_s"]
        figures = single_figures(StreamRun(times[0], times[-1], answer["tokens"], times))
        figures["kv_state_bytes"] = answer.get("kv_state_bytes")
        figures["positions"] = answer.get("positions")
        return figures

    def streams(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        answer = self._ask({"op": "streams", "prompts": prompts, "new_tokens": new_tokens})
        return streams_figures([StreamRun(s["first_s"], s["last_s"], s["tokens"], s["token_times_s"]) for s in answer["streams"]])


def _tree_rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


# -- files and exports --------------------------------------------------------------------


@dataclass
class Pair:
    """One comparison: the appliance's `quant` variant of `gguf_file` against llama.cpp on it."""

    label: str  # e.g. "Q4_0:int4"
    gguf_file: Path
    quant: str
    model_name: str
    file_record: dict[str, Any] = field(default_factory=dict)


def resolve_pairs(args: argparse.Namespace) -> list[Pair]:
    pairs = []
    for spec in args.pair or list(DEFAULT_PAIRS):
        left, _, quant = spec.rpartition(":")
        if not left or not quant:
            raise SystemExit(f"--pair {spec!r}: write TYPE:QUANT (Q4_0:int4) or FILE.gguf:QUANT")
        if left.lower().endswith(".gguf"):
            path = Path(left).expanduser().resolve()
            name = "bench-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem.lower())
            pairs.append(Pair(spec, path, quant, name[:64]))
            continue
        if args.shape is None:
            raise SystemExit(f"--pair {spec!r} names a file type: give --shape too")
        written = gguf_shapes.ensure_gguf(args.shape, left, args.work / "gguf", seed=args.seed)
        pairs.append(Pair(spec, written.path, quant, f"bench-{args.shape}-{left}".lower(), written.record))
    return pairs


#: `--kv-cache` -> the manifest's KV datatype an existing version must have.
KV_DATATYPES = {"fp32": "FP32", "int8": "INT8"}


def ensure_export(pair: Pair, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:  # -> (ModelVersion, facts)
    """The appliance version of `pair`, exported unless the same file's variant is there."""
    from appliance.errors import ModelNotFound
    from appliance.export.sources.base import sha256_files
    from appliance.repository.store import ModelRepository

    state = args.work / "state"
    repository = ModelRepository(state / "models")
    digest = sha256_files([pair.gguf_file])

    def existing() -> Any:  # noqa: ANN401 - ModelVersion | None
        try:
            versions = repository.versions(pair.model_name)
        except ModelNotFound:
            return None
        kv = KV_DATATYPES.get(args.kv_cache)
        same = [
            v for v in versions
            if v.variant == pair.quant and v.manifest.source.sha256 == digest
            and (kv is None or (v.manifest.generation is not None and v.manifest.generation.kv_datatype == kv))
        ]
        return same[-1] if same else None

    version = None if args.fresh_export else existing()
    facts: dict[str, Any] = {"exported_now": version is None}
    if version is None:
        (args.work / "logs").mkdir(parents=True, exist_ok=True)
        log_path = args.work / "logs" / f"export-{pair.model_name}-{pair.quant}.log"
        command = [
            sys.executable, "-m", "appliance", "export", str(pair.gguf_file), "--name", pair.model_name,
            "--quant", pair.quant, "--force", "--state-dir", str(state), "--kv-cache", args.kv_cache,
        ]
        env = {**os.environ, "APPLIANCE_CPU_THREADS": str(args.threads)}
        print(f"exporting {pair.gguf_file.name} -> {pair.model_name} {pair.quant} (log: {log_path}) ...", flush=True)
        started = time.perf_counter()
        with open(log_path, "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        facts["export_wall_s"] = round(time.perf_counter() - started, 1)
        if code != 0:
            raise RuntimeError(f"appliance export failed ({code}): {log_path.read_text()[-3000:]}")
        version = existing()
        if version is None:
            raise RuntimeError(f"appliance export published no {pair.quant} version of {pair.model_name}")
    report = version.report
    facts.update(
        version=version.version,
        path=str(version.path),
        size_bytes=version.size_bytes,
        export_s=(report.model_extra or {}).get("export_s") if report is not None else None,
        verdict=report.verdict if report is not None else None,
        notes=report.notes if report is not None else [],
    )
    return version, facts


# -- bytes read per token -----------------------------------------------------------------

#: Operators that only look up rows of an initializer (or read its shape): a decode step reads
#: one row of an embedding table or a rotary cache, not the table.
ROW_LOOKUP_OPS = frozenset({"Gather", "GatherBlockQuantized", "GatherElements", "GroupQueryAttention", "RotaryEmbedding", "Reshape", "Shape", "Slice"})


def appliance_weight_bytes(version: Any, *, packed: bool = True) -> int:  # noqa: ANN401 - ModelVersion
    """Bytes of the initializers a decode step reads: all but those only looked up by row.
    `packed`: a MatMulNBits weight (codes, scales, zero points) counts as the CPU kernel keeps
    it at accuracy level 4, with its fp32 block sums (mlas_packing.py); else as stored."""
    import onnx

    model = onnx.load(str(version.model_path), load_external_data=False)
    consumers: dict[str, set[str]] = defaultdict(set)
    packed_weights: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
        if packed and node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            level = attrs.get("accuracy_level", 0)
            if level == INT8_COMPUTE_ACCURACY_LEVEL:
                packed_weights[node.input[1]] = packed_bytes(attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"], level)
                packed_weights.update({name: 0 for name in node.input[2:] if name})  # inside the packed figure
    total = 0
    for tensor in model.graph.initializer:
        ops = consumers.get(tensor.name, set())
        if ops and ops <= ROW_LOOKUP_OPS:
            continue
        if ops == {"MatMulNBits"} and tensor.name in packed_weights:
            total += packed_weights[tensor.name]
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def llama_weight_bytes(gguf_file: Path) -> int:
    """Bytes of the GGUF tensors a decode step reads: all but an embedding that is not also the
    output head (with no output.weight, llama.cpp multiplies by token_embd)."""
    from appliance.export.llm.gguf_header import read_gguf_header

    tensors = read_gguf_header(gguf_file).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return sum(t.size_bytes for t in tensors if not (untied and t.name == "token_embd.weight") and t.name != "rope_freqs.weight")


def kv_facts(bytes_per_token: int) -> dict[str, Any]:
    return {
        "kv_bytes_per_token": bytes_per_token,
        "kv_mib_per_2000_token_sequence": round(bytes_per_token * KV_SEQUENCE_TOKENS / 2**20, 1),
        "sequences_of_2000_in_8_gib": KV_BUDGET_BYTES // (bytes_per_token * KV_SEQUENCE_TOKENS),
    }


# -- one pair -----------------------------------------------------------------------------


def measure_pair(pair: Pair, version: Any, args: argparse.Namespace, workload: Workload, gate: Gate, bandwidth_gbps: float) -> dict[str, Any]:  # noqa: ANN401
    spec = version.manifest.generation
    dtype_bytes = {"FP32": 4, "FP16": 2, "INT8": 1}.get(spec.kv_datatype, 4)
    ours_kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype_bytes
    llama_kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * LLAMA_KV_BYTES
    weights = {"appliance": appliance_weight_bytes(version), "llama.cpp": llama_weight_bytes(pair.gguf_file)}
    kv_per_token = {"appliance": ours_kv, "llama.cpp": llama_kv}
    result: dict[str, Any] = {
        "gguf": str(pair.gguf_file),
        "gguf_bytes": pair.gguf_file.stat().st_size,
        "gguf_tensor_types": pair.file_record.get("tensor_types"),
        "quant": pair.quant,
        "model": pair.model_name,
        "weights_read_per_token_bytes": weights,
        "appliance_weights_stored_bytes": appliance_weight_bytes(version, packed=False),
        "kv": {"appliance": {"dtype": spec.kv_datatype, **kv_facts(ours_kv)}, "llama.cpp": {"dtype": "F16", **kv_facts(llama_kv)}},
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
    }
    # What the box can compute at all for the stream runs and the long prompt (compute_limit.py):
    # the ceiling the batched targets are read against, as the bandwidth is for one stream.
    # Probed before the servers start and again after they stop, the faster counting.
    matrices = compute_limit.weight_matrices(version.model_path)
    rows = compute_limit.rows_timed(STREAM_COUNTS, args.prefill_chunk_tokens)

    def probe_compute() -> compute_limit.Timings:
        def work() -> dict[str, Any]:
            return {"timings": compute_limit.time_matrices(matrices, rows, threads=args.threads, runs=COMPUTE_LIMIT_RUNS)}

        return gate.run({os.getpid()}, work)["timings"]

    compute_probes = [probe_compute()]
    sides: list[Any] = []
    max_streams = max(STREAM_COUNTS)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    with ApplianceSide(version, args.work, args.threads, max_streams, args.prefill_chunk_tokens) as ours:
        sides.append(ours)
        llama: LlamaSide | None = None
        if not args.skip_llamacpp:
            llama = LlamaSide(pair.gguf_file, args.work, args.threads, args).__enter__()
            sides.append(llama)
            result["llama_cpp_facts"] = {k: v for k, v in llama.facts.items() if k != "ready"}
        try:
            jobs: list[tuple[str, Callable[[Any], dict[str, Any]], Callable[[Any], dict[str, Any]]]] = []
            for length, ids in workload.decode.items():
                jobs.append((f"decode_after_{length}", _single(ids, args.new_tokens), _single(ids, WARMUP_TOKENS)))
            for length, ids in workload.ttft.items():
                jobs.append((f"ttft_{length}", _single(ids, 1), _single(ids, 1)))
            for count, prompts in workload.streams.items():
                jobs.append((f"streams_{count}", _streams(prompts, args.new_tokens), _streams(prompts, WARMUP_TOKENS)))
            for job, measure, warm in jobs:
                if args.jobs and job not in args.jobs:
                    continue
                print(f"  {pair.label} {job}: warm-up", flush=True)
                for side in sides:
                    warm(side)
                for repeat in range(args.repeats):
                    for side in sides:
                        figures = gate.run({os.getpid(), side.pid}, lambda side=side: measure(side))
                        raw[side.name][job].append(figures)
                        print(f"  {pair.label} {job} {side.name} pass {repeat + 1}: {_brief(figures)}", flush=True)
            for side in sides:
                result.setdefault("rss_bytes", {})[side.name] = side.rss_bytes()
        finally:
            if llama is not None:
                llama.__exit__(None, None, None)
    compute_probes.append(probe_compute())
    result["compute_limit"] = compute_limit.summarise(
        version.model_path, matrices, compute_limit.fastest(*compute_probes), streams=STREAM_COUNTS, chunk_rows=args.prefill_chunk_tokens,
        prompt_tokens=STREAM_PROMPT, new_tokens=args.new_tokens, long_prompt=max(DECODE_PROMPTS), threads=args.threads,
    )
    for side_name, jobs_raw in raw.items():
        summary = {job: medians(passes) for job, passes in jobs_raw.items()}
        for length in DECODE_PROMPTS:
            figures = summary.get(f"decode_after_{length}")
            if figures and figures.get("decode_tok_s"):
                context = length + args.new_tokens / 2
                per_token = weights[side_name] + kv_per_token[side_name] * context
                figures["bytes_read_per_token"] = int(per_token)
                figures["bandwidth_fraction"] = figures["decode_tok_s"] * per_token / (bandwidth_gbps * 1e9)
        result[side_name] = summary
        result.setdefault("passes", {})[side_name] = {job: [_strip(p) for p in passes] for job, passes in jobs_raw.items()}
    return result


def _single(ids: list[int], new_tokens: int) -> Callable[[Any], dict[str, Any]]:
    return lambda side: side.single(ids, new_tokens)


def _streams(prompts: list[list[int]], new_tokens: int) -> Callable[[Any], dict[str, Any]]:
    return lambda side: side.streams(prompts, new_tokens)


def _strip(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in figures.items()}


def _brief(figures: dict[str, Any]) -> str:
    parts = []
    for key in ("ttft_s", "decode_tok_s", "aggregate_tok_s", "itl_p99_s", "foreign_cpu_share"):
        value = figures.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.3f}")
    return ", ".join(parts)


def chunk_sweep(pair: Pair, version: Any, args: argparse.Namespace, workload: Workload, gate: Gate) -> dict[str, Any]:  # noqa: ANN401
    """The appliance's TTFT for the longest decode prompt at each chunked-prefill size."""
    length = max(DECODE_PROMPTS)
    ids = workload.decode[length]
    out: dict[str, Any] = {"prompt_tokens": length}
    for chunk in args.chunk_sweep:
        with ApplianceSide(version, args.work, args.threads, 1, chunk) as ours:
            ours.single(ids, 1)
            passes = [gate.run({os.getpid(), ours.pid}, lambda: ours.single(ids, 1)) for _ in range(args.repeats)]
        out[str(chunk)] = medians(passes)
        print(f"  chunk {chunk}: TTFT {out[str(chunk)]['ttft_s']:.3f} s", flush=True)
    return out


# -- report -------------------------------------------------------------------------------


def _fmt(value: Any, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:  # noqa: ANN401
    return "-" if not isinstance(value, int | float) else f"{value * scale:.{digits}f}{unit}"


def _ratio(a: Any, b: Any) -> str:  # noqa: ANN401
    return f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"


def print_report(report: dict[str, Any]) -> None:
    box = report["box"]
    bandwidth = ", ".join(f"{t} thread{'s' if t != '1' else ''} {v:.1f} GB/s" for t, v in box["bandwidth_gbps"].items())
    print(f"\nmachine: {box['machine']}; flags {' '.join(box['cpu_flags']) or '-'}; L3 {box['l3_bytes'] / 2**20:.0f} MiB")
    print(f"threads {report['threads']}; bandwidth (streaming read): {bandwidth}; {report['new_tokens']} new tokens, greedy, EOS ignored")
    for label, pair in report["pairs"].items():
        if "error" in pair:
            print(f"\n{report['shape'] or ''} {label}: FAILED: {pair['error']}")
            continue
        ours, theirs = pair.get("appliance", {}), pair.get("llama.cpp", {})
        print(f"\n{report['shape'] or pair['gguf']} — appliance {pair['quant']} vs llama.cpp, both from {Path(pair['gguf']).name}")
        print(f"{'':34}{'appliance':>12}{'llama.cpp':>12}{'ratio':>9}  target")
        def row(title: str, job: str, key: str, scale: float = 1.0, digits: int = 1, target: str = "", unit: str = "") -> None:
            a, b = ours.get(job, {}).get(key), theirs.get(job, {}).get(key)
            print(f"{title:34}{_fmt(a, scale, digits, unit):>12}{_fmt(b, scale, digits, unit):>12}{_ratio(a, b):>9}  {target}")

        for length in DECODE_PROMPTS:
            job = f"decode_after_{length}"
            row(f"decode tok/s after {length}", job, "decode_tok_s", target=">= 1.2" if length == 100 else "")
            row(f"  TTFT {length} (ms)", job, "ttft_s", 1000, 0, "<= 0.7" if length == 2000 else "")
            row("  ITL p50 (ms)", job, "itl_p50_s", 1000)
            row("  ITL p99 (ms)", job, "itl_p99_s", 1000)
            row("  bytes read per token (MB)", job, "bytes_read_per_token", 1e-6, 0)
            row("  fraction of bandwidth", job, "bandwidth_fraction", 100, 0, ">= 80% (moonshot)" if length == 100 else "", "%")
        for length in TTFT_PROMPTS:
            row(f"TTFT {length} (ms)", f"ttft_{length}", "ttft_s", 1000, 0)
        for count in STREAM_COUNTS:
            job = f"streams_{count}"
            row(f"{count} streams aggregate tok/s", job, "aggregate_tok_s")
            row("  decode-phase tok/s", job, "decode_tok_s")
            row("  decode-phase tok/s, counted", job, "decode_tok_s_counted")
            row("  TTFT median (ms)", job, "ttft_s", 1000, 0)
            row("  ITL p50 (ms)", job, "itl_p50_s", 1000)
            row("  ITL p99 (ms)", job, "itl_p99_s", 1000)
        single = theirs.get("decode_after_100", {}).get("decode_tok_s")
        ours_single_itl = ours.get("decode_after_100", {}).get("itl_p99_s")
        if single:
            for count, target in zip(STREAM_COUNTS, (">= 3", ">= 4")):
                agg = ours.get(f"streams_{count}", {}).get("aggregate_tok_s")
                print(f"appliance {count} streams / llama.cpp single decode: {_ratio(agg, single)} (target {target})")
        p99 = ours.get(f"streams_{max(STREAM_COUNTS)}", {}).get("itl_p99_s")
        print(f"appliance {max(STREAM_COUNTS)}-stream ITL p99 / its single-stream ITL p99 (after 100): {_ratio(p99, ours_single_itl)} (target <= 5)")
        if pair.get("compute_limit"):
            print("\nwhat the box can compute (bench/compute_limit.py: the version's matrices timed alone, an upper bound):")
            compute_limit.print_report(pair["compute_limit"], compute_limit.sizes_run(pair, max(DECODE_PROMPTS)))
        for side in ("appliance", "llama.cpp"):
            kv = pair["kv"][side]
            weights = pair["weights_read_per_token_bytes"][side]
            rss = pair.get("rss_bytes", {}).get(side)
            stored = pair.get("appliance_weights_stored_bytes") if side == "appliance" else None
            print(
                f"{side}: weights read per token {weights / 1e6:.0f} MB"
                + (f" as the CPU kernel packs them ({stored / 1e6:.0f} MB stored)" if stored else "")
                + f"; KV {kv['dtype']} {kv['kv_bytes_per_token']:,} B/token, "
                f"{kv['sequences_of_2000_in_8_gib']} sequences of 2,000 tokens in 8 GiB"
                + (f"; resident {rss / 2**20:.0f} MiB" if rss else "")
            )
        state = theirs.get("decode_after_2000", {}).get("kv_state_bytes")
        if state:
            print(f"llama.cpp's own KV state after {theirs['decode_after_2000'].get('positions', 0):.0f} positions: {state:,.0f} B")
        export = pair.get("export", {})
        if export.get("export_s"):
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in export["export_s"].items())
            print(f"export ({pair['quant']}, verdict {export.get('verdict')}): {stages}")
        shares = [s for side in ("appliance", "llama.cpp") for job in pair.get(side, {}).values() if isinstance(job, dict) for s in job.get("foreign_cpu_shares", [])]
        ungated = [job for side in ("appliance", "llama.cpp") for job, f in pair.get(side, {}).items() if isinstance(f, dict) and not f.get("all_gated", True)]
        if shares:
            gating = "gating off" if not report["gated"] else (f"not quiet: {', '.join(ungated)}" if ungated else "every pass quiet")
            print(f"foreign CPU during passes: max {max(shares):.0%} ({gating})")
    if report.get("chunk_sweep"):
        sweep = report["chunk_sweep"]
        cells = ", ".join(f"{k}: {v['ttft_s'] * 1000:.0f} ms" for k, v in sweep.items() if isinstance(v, dict))
        print(f"\nchunked prefill sweep, appliance TTFT for {sweep['prompt_tokens']} tokens: {cells}")


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(gguf_shapes.SHAPES), help="benchmark shape (bench/gguf_shapes.py --list)")
    parser.add_argument("--pair", action="append", help="TYPE:QUANT or FILE.gguf:QUANT, repeatable (default Q4_0:int4 and Q8_0:int8)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="GGUF files, state dir, logs (default bench/.work/sizes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=gguf_shapes.DEFAULT_SEED)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256, help="the appliance's chunked-prefill size (its default: 256)")
    parser.add_argument("--chunk-sweep", type=lambda s: [int(x) for x in s.split(",")], default=[], help="e.g. 128,256,512,1024")
    parser.add_argument("--llama-flash-attn", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--llama-n-batch", type=int, default=2048)
    parser.add_argument("--llama-n-ubatch", type=int, default=512)
    parser.add_argument("--llama-kv-unified", action="store_true", help="one KV buffer for all sequences (default: one per sequence)")
    parser.add_argument("--kv-cache", choices=("fp32", "int8"), default="fp32", help="the export's --kv-cache (an existing version is reused only with that KV type)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure the appliance only (no bench/.venv-llamacpp needed)")
    parser.add_argument("--export-only", action="store_true", help="write the files and export the variants, then stop")
    parser.add_argument("--fresh-export", action="store_true", help="export a new version even when one from the same file is there")
    parser.add_argument(
        "--jobs", type=lambda s: s.split(","), default=[],
        help="measure only these workloads, e.g. decode_after_100,ttft_2000 (default: all; names as in the JSON)",
    )
    add_gate_arguments(parser)
    parser.add_argument("--bandwidth-mib", type=int, help="bandwidth buffer size (default max(1 GiB, 32 x L3))")
    parser.add_argument("--json", type=Path, help="write the raw figures here (after every pair)")
    args = parser.parse_args()
    if args.shape is None and not args.pair:
        parser.error("give --shape, or --pair FILE.gguf:QUANT")
    if not args.skip_llamacpp and not args.export_only and not LLAMA_PYTHON.exists():
        raise SystemExit("llama.cpp's venv is missing: run `.venv/bin/python bench/llm_vs_llamacpp.py --setup` first (or --skip-llamacpp)")
    args.work = args.work.resolve()

    from appliance.offline import enforce_offline

    enforce_offline()
    gate = Gate(args.max_foreign, args.quiet_wait_s, args.max_tries, enabled=not args.no_gate)
    pairs = resolve_pairs(args)
    exports = {pair.label: ensure_export(pair, args) for pair in pairs}
    if args.export_only:
        for label, (_version, facts) in exports.items():
            print(f"{label}: {facts}")
        return

    box: dict[str, Any] = {"machine": machine(), "cpu_flags": cpu_flags(), "l3_bytes": l3_bytes(), "bandwidth_gbps": {}}
    buffer_bytes = (args.bandwidth_mib or 0) * 2**20 or max(2**30, 32 * box["l3_bytes"])
    buffer_bytes = min(buffer_bytes, psutil.virtual_memory().available // 4)
    box["bandwidth_buffer_bytes"] = buffer_bytes
    buffer = np.ones(buffer_bytes // 8, dtype=np.uint64)  # written once: every page resident
    for threads in sorted({1, args.threads}):
        passes = [gate.run({os.getpid()}, lambda threads=threads: {"gbps": stream_read_gbps(buffer, threads)}) for _ in range(max(args.repeats, 3))]
        box["bandwidth_gbps"][str(threads)] = medians(passes)["gbps"]
        box.setdefault("bandwidth_passes", {})[str(threads)] = passes
    del buffer
    bandwidth = box["bandwidth_gbps"][str(args.threads)]

    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "shape": args.shape, "threads": args.threads, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "gated": not args.no_gate, "max_foreign": args.max_foreign, "box": box, "pairs": {},
    }
    if args.shape:
        report["shape_facts"] = gguf_shapes.describe(gguf_shapes.SHAPES[args.shape])
    for pair in pairs:
        version, export_facts = exports[pair.label]
        print(f"{pair.label}: {pair.gguf_file.name} vs {pair.model_name} v{version.version}", flush=True)
        workload = prompt_ids(pair.gguf_file, args.seed)
        try:
            result = measure_pair(pair, version, args, workload, gate, bandwidth)
        except Exception as exc:  # noqa: BLE001 - keep the other pairs' figures of a long run
            result = {"error": f"{type(exc).__name__}: {exc}", "gguf": str(pair.gguf_file), "quant": pair.quant}
            print(f"{pair.label} failed: {result['error']}", file=sys.stderr, flush=True)
        result["export"] = export_facts
        report["pairs"][pair.label] = result
        if args.chunk_sweep and pair is pairs[0] and "error" not in result:
            report["chunk_sweep"] = chunk_sweep(pair, version, args, workload, gate)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    if args.json:
        print(f"\nraw figures: {args.json}")


if __name__ == "__main__":
    main()
