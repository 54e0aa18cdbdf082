"""bench/llamacpp_worker.py, llama.cpp's side of the size benchmark, against a stand-in for
llama-cpp-python's C API that enforces llama_decode's contract (each sequence's positions
contiguous from 0, within its share of the cells, batches no larger than n_batch, logits read
only where requested). The real llama.cpp lives in bench/.venv-llamacpp, which tests never
build; this checks the worker's batching and protocol in a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_LLAMA_CPP = '''
import ctypes
from types import SimpleNamespace

import numpy as np

__version__ = "stand-in"
N_VOCAB = 64


def llama_backend_init(): pass
def llama_model_default_params(): return SimpleNamespace()
def llama_model_load_from_file(path, params): return SimpleNamespace(path=path)
def llama_model_get_vocab(model): return object()
def llama_vocab_n_tokens(vocab): return N_VOCAB
def llama_model_size(model): return 1
def llama_model_n_params(model): return 1
def llama_print_system_info(): return b"stand-in"
def llama_free(ctx): pass
def llama_batch_free(batch): pass
def llama_get_memory(ctx): return ctx
def llama_memory_clear(memory, data): memory.positions = {}
def llama_state_seq_get_size(ctx, seq): return ctx.positions.get(seq, 0) * 10


def llama_context_default_params():
    return SimpleNamespace(n_ctx=512, n_batch=2048, n_ubatch=512, n_seq_max=1, n_threads=1, n_threads_batch=1,
                           flash_attn_type=-1, kv_unified=False, no_perf=False)


class Context:
    def __init__(self, params):
        self.params = params
        self.positions = {}
        self.rows = {}
        self.logits = (ctypes.c_float * (N_VOCAB * params.n_batch))()


def llama_init_from_model(model, params): return Context(SimpleNamespace(**vars(params)))


class Batch:
    def __init__(self, capacity):
        self.capacity = capacity
        self.token = [0] * capacity
        self.pos = [0] * capacity
        self.n_seq_id = [0] * capacity
        self.seq_id = [[0] for _ in range(capacity)]
        self.logits = [0] * capacity
        self.n_tokens = 0


def llama_batch_init(capacity, embd, n_seq_max): return Batch(capacity)


def llama_decode(ctx, batch):
    params = ctx.params
    assert 0 < batch.n_tokens <= min(params.n_batch, batch.capacity)
    cells = params.n_ctx if params.kv_unified else params.n_ctx // params.n_seq_max
    ctx.rows = {}
    view = np.ctypeslib.as_array(ctx.logits)
    for i in range(batch.n_tokens):
        seq = batch.seq_id[i][0]
        assert batch.n_seq_id[i] == 1 and 0 <= seq < params.n_seq_max
        assert batch.pos[i] == ctx.positions.get(seq, 0), "positions must continue the sequence"
        ctx.positions[seq] = batch.pos[i] + 1
        assert ctx.positions[seq] <= cells, "sequence ran out of KV cells"
        if batch.logits[i]:
            row = len(ctx.rows)
            ctx.rows[i] = row
            view[row * N_VOCAB:(row + 1) * N_VOCAB] = 0
            view[row * N_VOCAB + (batch.token[i] + 1) % N_VOCAB] = 1  # greedy continues +1
    return 0


def llama_get_logits_ith(ctx, i):
    assert i in ctx.rows, "logits read where none were requested"
    return ctypes.cast(ctypes.byref(ctx.logits, ctx.rows[i] * N_VOCAB * 4), ctypes.POINTER(ctypes.c_float))
'''


def _run_worker(tmp_path: Path, commands: list[dict], n_batch: int = 4) -> list[dict]:
    package = tmp_path / "llama_cpp"
    package.mkdir()
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    argv = [sys.executable, str(ROOT / "bench" / "llamacpp_worker.py"), "model.gguf", "2", "auto", str(n_batch), "2", "0"]
    stdin = "".join(json.dumps(command) + "\n" for command in [*commands, {"op": "quit"}])
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_single_stream_prefills_in_batches_then_decodes_one_token_at_a_time(tmp_path: Path) -> None:
    ready, single = _run_worker(tmp_path, [{"op": "single", "ids": [1, 2, 3, 4, 5], "new_tokens": 4}])
    assert ready["ready"] and ready["n_batch"] == 4
    assert "error" not in single, single
    assert single["tokens"] == 4 and single["positions"] == 8  # 5 prompt + 3 fed-back tokens
    assert single["first_s"] == single["token_times_s"][0] <= single["token_times_s"][-1]


def test_streams_share_batches_and_each_sequence_keeps_its_positions(tmp_path: Path) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    _ready, answer = _run_worker(tmp_path, [{"op": "streams", "prompts": prompts, "new_tokens": 3}])
    assert "error" not in answer, answer
    streams = answer["streams"]
    assert [s["tokens"] for s in streams] == [3, 3, 3]
    assert all(s["first_s"] <= s["last_s"] for s in streams)


def test_a_failing_command_is_answered_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    _ready, bad, good = _run_worker(tmp_path, [{"op": "bogus"}, {"op": "single", "ids": [1], "new_tokens": 2}])
    assert bad["error"] == "unknown op 'bogus'"
    assert good["tokens"] == 2
