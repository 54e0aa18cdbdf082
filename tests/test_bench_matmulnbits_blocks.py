"""bench/matmulnbits_blocks.py: every (bits, block) form packs its codes as MatMulNBits reads
them (ONNX Runtime's product equals numpy's over the dequantised weights), counts the bytes it
stores, and refuses a K its block does not divide. Tiny matrices: seconds."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.bench_modules import load_bench_module

blocks = load_bench_module("matmulnbits_blocks")


@pytest.mark.parametrize("bits", blocks.BITS)
@pytest.mark.parametrize("block", blocks.BLOCKS)
def test_each_form_computes_the_product_of_its_dequantised_weights(bits: int, block: int) -> None:
    form = blocks.make_form(bits, block, k_dim=256, n_dim=24, layers=2, seed=bits + block)
    runner = blocks.session(form, threads=1)
    x = np.random.default_rng(7).standard_normal((1, 3, 256)).astype(np.float32)
    assert blocks.relative_error(runner, form, x) <= blocks.RELATIVE_ERROR_LIMIT
    codes_per_layer = 24 * 256 * bits // 8
    scales_per_layer = 24 * (256 // block) * 4
    assert form.weight_bytes == 2 * (codes_per_layer + scales_per_layer)
    assert form.name == f"{bits}-bit/{block}"


def test_a_k_the_block_does_not_divide_is_refused() -> None:
    with pytest.raises(SystemExit, match="not a multiple of the block size 128"):
        blocks.make_form(4, 128, k_dim=96, n_dim=8, layers=1, seed=0)
