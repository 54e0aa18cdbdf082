"""The GPU scripts stay runnable where CI runs, without a GPU (they ran on an H200 once; see
docs/BENCHMARKS.md): scripts/gpu_check.py must finish with exit 0, name the missing GPU
providers as warnings and still time the CPU parts (the appliance's selection, MatMulNBits'
zero-point forms, its 8-bit blocks); scripts/gpu_decoder.py's loop and scripts/gpu_engine.py must give the
reference tokens on the CPU provider."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.generation import TinyDecoders, reference_greedy, tiny_decoders  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_a_cpu_only_box_and_says_what_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--layers", "1", "--runs", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("WARN cuda session") for line in lines), done.stdout
    assert any(line.startswith("OK   appliance selection: cpu") for line in lines), done.stdout
    timing = next(line for line in lines if "MatMulNBits zero points" in line)
    assert "uint8" in timing and "float" in timing
    blocks = next(line for line in lines if "MatMulNBits 8-bit blocks" in line)
    assert blocks.startswith("OK") and "block 32:" in blocks and "block 128:" in blocks, blocks


def _script(name: str):  # noqa: ANN202 - a module loaded from scripts/
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_decoder_loop_gives_the_reference_tokens_on_the_cpu(tiny_decoders: TinyDecoders) -> None:
    version = tiny_decoders.llama_fp16
    prompt = [5, 17, 42, 99, 150, 7]
    decoder = _script("gpu_decoder").Decoder(version.path, "cpu", batch=2, max_len=32)
    assert decoder.greedy(prompt, 12) == reference_greedy(version, prompt, 12)


def test_the_gpu_engine_script_records_and_checks_on_the_cpu(tiny_decoders: TinyDecoders, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    shutil.copytree(tiny_decoders.llama_fp16.path.parent.parent, state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    script = _script("gpu_engine")
    script.record(state, "tiny-llama")
    assert script.run(state, "tiny-llama", [1, 2]) == 0
    out = capsys.readouterr().out
    assert "engine placement: cpu" in out
    assert f"agrees with the CPU record for {script.RECORD_TOKENS}/{script.RECORD_TOKENS} tokens" in out
    assert "batched vs alone (4 sequences, 16-40 tokens): identical, identical, identical, identical" in out
    assert "answer vs no cache: identical" in out
    assert "engine 2 stream(s)" in out
