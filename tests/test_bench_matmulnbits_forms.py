"""bench/matmulnbits_forms.py: both MatMulNBits forms of one Q4_0 matrix are built from the
export's own grid recovery, carry (or lack) the zero-point input they claim, and compute the
fp32 product. Tiny matrices: seconds."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.bench_modules import load_bench_module

gguf = pytest.importorskip("gguf")

forms = load_bench_module("matmulnbits_forms")


def test_the_two_forms_compute_the_same_product_as_the_fp32_weights() -> None:
    weights = forms.q4_0_weights(96, 40, 2, seed=3)
    x = np.random.default_rng(4).standard_normal((1, 3, 96)).astype(np.float32)
    results = []
    for symmetric in (False, True):
        outputs = forms.session(weights, symmetric, threads=1).run(None, {"x": x})
        for got, weight in zip(outputs, weights, strict=True):
            expected = x @ weight
            # accuracy_level 4 rounds the activations to int8 inside the kernel.
            assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()
        results.append(outputs)
    for with_points, without in zip(*results, strict=True):
        np.testing.assert_allclose(with_points, without, rtol=0, atol=1e-3 * float(np.abs(without).max()))


def test_the_zero_point_form_has_positive_scales_and_zero_points_seven_or_eight() -> None:
    grid = forms.recover_grid(forms.q4_0_weights(64, 48, 1, seed=5)[0], forms.BLOCK)
    assert grid is not None and (grid.scales < 0).any() and (grid.scales > 0).any()
    flipped = forms.with_zero_points(grid)
    assert (flipped.scales >= 0).all() and not flipped.is_symmetric()
    assert set(np.unique(flipped.integer_zero_points())) <= {7, 8}
    rebuilt = flipped.codes * flipped.scales[..., None] + flipped.mins[..., None]
    original = grid.codes * grid.scales[..., None] + grid.mins[..., None]
    np.testing.assert_allclose(rebuilt, original, rtol=0, atol=1e-6)
