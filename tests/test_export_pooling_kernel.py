"""The pooling graph piece computes exactly what its numpy reference (and the torch reference
the export evaluates against) computes, for every mode, with and without normalisation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.kernels.pooling import POOLING_MODES, pool_numpy, pooling_model

HIDDEN = 12
MASK = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=np.int64)


def _hidden(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 6, HIDDEN)).astype(np.float32)


@pytest.mark.parametrize("opset", [14, 17, 18])
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_graph_matches_numpy_reference(mode: str, normalize: bool, opset: int) -> None:
    model = pooling_model(HIDDEN, mode=mode, normalize=normalize, opset=opset)  # type: ignore[arg-type]
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = _hidden()
    got = session.run(None, {"hidden": hidden, "attention_mask": MASK})[0]
    np.testing.assert_allclose(got, pool_numpy(hidden, MASK, mode=mode, normalize=normalize), atol=1e-5)  # type: ignore[arg-type]


def test_padding_tokens_do_not_change_mean_pooling() -> None:
    hidden = _hidden()
    noisy = hidden.copy()
    noisy[0, 3:] = 1000.0  # padding positions of row 0
    np.testing.assert_allclose(pool_numpy(noisy, MASK), pool_numpy(hidden, MASK), atol=1e-6)


def test_normalised_embeddings_have_unit_length() -> None:
    pooled = pool_numpy(_hidden(1), MASK, mode="mean", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_torch_reference_pooling_matches_numpy(mode: str) -> None:
    import torch

    from appliance.export.tasks.feature_extraction import torch_pool

    hidden = _hidden(2)
    got = torch_pool(torch.from_numpy(hidden), torch.from_numpy(MASK), mode, True).numpy()  # type: ignore[arg-type]
    np.testing.assert_allclose(got, pool_numpy(hidden, MASK, mode=mode, normalize=True), atol=1e-5)  # type: ignore[arg-type]


def test_unknown_pooling_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling mode"):
        pooling_model(HIDDEN, mode="median")  # type: ignore[arg-type]
