"""bench/op_profile.py: ONNX Runtime's per-operator profile of one run of an exported tiny
decoder, a decode step of several rows and a prefill chunk after a past, grouped by operator
kind with MatMulNBits told apart by bits and block. Seconds."""

from __future__ import annotations

import pytest

from tests.helpers.bench_modules import load_bench_module
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture

op_profile = load_bench_module("op_profile")


@pytest.mark.parametrize(("rows", "new_tokens"), [(3, 1), (1, 5)])
def test_a_run_is_profiled_by_operator_kind(tiny_decoders: TinyDecoders, rows: int, new_tokens: int) -> None:  # noqa: F811
    result = op_profile.profile(tiny_decoders.llama_int4.path, rows=rows, new_tokens=new_tokens, past=4, runs=2, threads=1)
    kinds = result["kinds_ms"]
    matmuls = [kind for kind in kinds if kind.startswith("MatMulNBits ")]
    assert matmuls and all("-bit/" in kind for kind in matmuls)
    assert "GroupQueryAttention" in kinds and all(ms >= 0 for ms in kinds.values())
    assert result["run_ms_median"] > 0 and (result["rows"], result["new_tokens"]) == (rows, new_tokens)
    op_profile.print_table(result)
