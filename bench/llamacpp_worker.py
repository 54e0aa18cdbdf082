"""llama.cpp's side of bench/llm_sizes_vs_llamacpp.py: one GGUF file driven through
llama-cpp-python's low-level C API, the way llama.cpp's own server drives it.

Runs only in bench/.venv-llamacpp (made by `bench/llm_vs_llamacpp.py --setup`); must never be
imported by the appliance or run in its venv. Never tokenises: it is given token ids, so it
reads exactly the ids the appliance reads.

Started as `python llamacpp_worker.py FILE THREADS FLASH_ATTN N_BATCH N_UBATCH KV_UNIFIED`; it
loads the model, prints one JSON line ({"ready": true, ...}), then answers one JSON line per
command line on stdin:

* {"op": "single", "ids": [...], "new_tokens": N}: prefill the prompt in batches of N_BATCH,
  then decode greedily one token at a time. Answers {"first_s", "token_times_s", "tokens",
  "kv_state_bytes", "positions"}.
* {"op": "streams", "prompts": [[...], ...], "new_tokens": N}: one sequence per prompt, as
  llama-server's parallel slots: the prompts' tokens packed into shared batches of up to
  N_BATCH (each sequence's first token taken as soon as its last prompt token is decoded), then
  one batch per step with one token of every sequence. KV cells per sequence = the context /
  sequences (KV_UNIFIED 0, llama.cpp's advice for sequences that share no prefix). Answers
  {"streams": [{"first_s", "last_s", "tokens", "token_times_s"}, ...]}.
* {"op": "quit"}.

Greedy = argmax of each output's logits (what llama.cpp's greedy sampler computes); EOS never
ends a sequence, so every stream makes exactly N tokens. Times are seconds from the moment the
command was read. A failed command answers {"error": "..."} and the worker keeps serving.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import numpy as np

import llama_cpp as L  # type: ignore[import-not-found]  # only in bench/.venv-llamacpp

FLASH_ATTN = {"auto": -1, "on": 1, "off": 0}


def _round_up(value: int, step: int = 256) -> int:
    return -(-value // step) * step


class Worker:
    def __init__(self, path: str, threads: int, flash: str, n_batch: int, n_ubatch: int, kv_unified: bool) -> None:
        try:
            from llama_cpp._logger import set_verbose  # type: ignore[import-not-found]

            set_verbose(False)
        except Exception:  # noqa: BLE001 - logging is cosmetic
            pass
        L.llama_backend_init()
        params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(vocab))
        self.threads, self.flash, self.n_batch, self.n_ubatch, self.kv_unified = threads, flash, n_batch, n_ubatch, kv_unified
        self.ctx: Any = None
        self.ctx_key: tuple[int, int] | None = None
        self.batch: Any = None
        self.batch_capacity = 0

    def facts(self) -> dict[str, Any]:
        info = L.llama_print_system_info()
        return {
            "ready": True,
            "llama_cpp_python": getattr(L, "__version__", "unknown"),
            "n_vocab": self.n_vocab,
            "model_size_bytes": int(L.llama_model_size(self.model)),
            "n_params": int(L.llama_model_n_params(self.model)),
            "system_info": info.decode() if isinstance(info, bytes) else str(info),
            "threads": self.threads,
            "flash_attn": self.flash,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "kv_unified": self.kv_unified,
        }

    # -- context and batch ------------------------------------------------------------------

    def context(self, n_ctx: int, n_seq: int) -> Any:  # noqa: ANN401 - llama_context_p
        """A context of n_ctx cells for n_seq sequences, emptied; one alive at a time."""
        if self.ctx_key != (n_ctx, n_seq):
            if self.ctx is not None:
                L.llama_free(self.ctx)
                self.ctx = None
            params = L.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_batch = self.n_batch
            params.n_ubatch = min(self.n_batch, self.n_ubatch)
            params.n_seq_max = n_seq
            params.n_threads = self.threads
            params.n_threads_batch = self.threads
            if hasattr(params, "flash_attn_type"):
                params.flash_attn_type = FLASH_ATTN[self.flash]
            elif hasattr(params, "flash_attn"):
                params.flash_attn = self.flash == "on"
            if hasattr(params, "kv_unified"):
                params.kv_unified = self.kv_unified
            params.no_perf = True
            self.ctx = L.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp cannot make a context of {n_ctx} cells for {n_seq} sequences")
            self.ctx_key = (n_ctx, n_seq)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        return self.ctx

    def _batch(self, capacity: int) -> Any:  # noqa: ANN401 - llama_batch
        if self.batch is None or capacity > self.batch_capacity:
            if self.batch is not None:
                L.llama_batch_free(self.batch)
            self.batch = L.llama_batch_init(capacity, 0, 1)  # each token in one sequence
            self.batch_capacity = capacity
        return self.batch

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self._batch(max(self.n_batch, len(entries)))
        for index, (token, pos, seq, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = pos
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = 1 if logits else 0
        batch.n_tokens = len(entries)
        code = L.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def argmax(self, index: int) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    # -- commands ---------------------------------------------------------------------------

    def single(self, ids: list[int], new_tokens: int) -> dict[str, Any]:
        # One context for every single-stream command (its cells are only allocated memory:
        # attention reads the cells in use), so commands do not rebuild it.
        self.context(max(4096, _round_up(len(ids) + new_tokens + 16)), 1)
        t0 = time.perf_counter()
        pos = 0
        token = 0
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self.decode([(tok, pos + i, 0, last and i == len(chunk) - 1) for i, tok in enumerate(chunk)])
            pos += len(chunk)
            if last:
                token = self.argmax(len(chunk) - 1)
        times = [time.perf_counter() - t0]
        for _ in range(new_tokens - 1):
            self.decode([(token, pos, 0, True)])
            pos += 1
            token = self.argmax(0)
            times.append(time.perf_counter() - t0)
        try:
            kv_state = int(L.llama_state_seq_get_size(self.ctx, 0))
        except Exception:  # noqa: BLE001 - older bindings
            kv_state = None
        return {"first_s": times[0], "token_times_s": times, "tokens": len(times), "kv_state_bytes": kv_state, "positions": pos}

    def streams(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        n = len(prompts)
        per_seq = _round_up(max(len(p) for p in prompts) + new_tokens + 16)
        self.context(per_seq * n, n)
        t0 = time.perf_counter()
        entries = [(tok, pos, seq, pos == len(prompt) - 1) for seq, prompt in enumerate(prompts) for pos, tok in enumerate(prompt)]
        times: list[list[float]] = [[] for _ in range(n)]
        next_token = [0] * n
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            self.decode(chunk)
            for index, (_tok, _pos, seq, wants) in enumerate(chunk):
                if wants:
                    next_token[seq] = self.argmax(index)
                    times[seq].append(time.perf_counter() - t0)
        for step in range(new_tokens - 1):
            self.decode([(next_token[seq], len(prompts[seq]) + step, seq, True) for seq in range(n)])
            for seq in range(n):
                next_token[seq] = self.argmax(seq)
            now = time.perf_counter() - t0
            for seq in range(n):
                times[seq].append(now)
        return {"streams": [{"first_s": t[0], "last_s": t[-1], "tokens": len(t), "token_times_s": t} for t in times]}


def main() -> None:
    path, threads, flash, n_batch, n_ubatch, kv_unified = sys.argv[1:7]
    worker = Worker(path, int(threads), flash, int(n_batch), int(n_ubatch), kv_unified == "1")
    print(json.dumps(worker.facts()), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.get("op")
        if op == "quit":
            break
        try:
            if op == "single":
                answer = worker.single(command["ids"], int(command["new_tokens"]))
            elif op == "streams":
                answer = worker.streams(command["prompts"], int(command["new_tokens"]))
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - report and keep serving
            answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
