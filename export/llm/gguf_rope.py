"""Llama 3 rope scaling, recovered from a GGUF's `rope_freqs.weight`.

llama.cpp's converter does not write Llama 3.1/3.2's `rope_scaling` into the header; it bakes
it into one F32 tensor, `rope_freqs.weight`: per rotary dimension pair i, the factor f_i that
the frequency theta^(-2i/d) is divided by. transformers' GGUF loader ignores that tensor and
sets no `rope_scaling`, so a model loaded from it would rotate with plain rope. Here the
tensor is turned back into `{"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings}`: the published presets are tried first, then the
parameters are solved for from the tensor, and a candidate is taken only if transformers'
own llama3 rope init reproduces every f_i (gguf_load.py checks that on the saved config).
A tensor no candidate reproduces is refused by name, never exported with a wrong rotary table.

Only (original / low_freq_factor) and (original / high_freq_factor) are visible in the factors,
so a solved (not preset) answer fixes low_freq_factor to 1 and the context to the matching
wavelength. Never imports torch or transformers at module level.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import GgufHeader

ROPE_FREQS_TENSOR = "rope_freqs.weight"
#: Relative tolerance between the tensor's factors and a reconstruction (float32 arithmetic).
FACTOR_RTOL = 1e-4
#: rope_scaling of the published Llama 3 releases, tried before solving.
LLAMA3_ROPE_PRESETS: dict[str, dict[str, Any]] = {
    "Llama 3.1": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "Llama 3.2": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def read_rope_freqs(header: GgufHeader) -> np.ndarray | None:
    """The F32 factors of `rope_freqs.weight`, or None when the file has no such tensor."""
    info = next((tensor for tensor in header.tensors if tensor.name == ROPE_FREQS_TENSOR), None)
    if info is None:
        return None
    if info.type_name != "F32" or len(info.dims) != 1:
        raise ExportError(
            f"source: {header.path.name}: {ROPE_FREQS_TENSOR} is {info.type_name} {list(info.dims)}, expected one F32 row",
            field="source",
        )
    with open(header.path, "rb") as handle:
        handle.seek(header.data_offset_bytes + info.offset_bytes)
        data = handle.read(info.dims[0] * 4)
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def default_inv_freq(rope_theta: float, rotary_dim: int) -> np.ndarray:
    """Plain rope's inverse frequencies, computed as transformers computes them (float32)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(rope_theta) ** exponents)).astype(np.float32)


def llama3_factors(scaling: dict[str, Any], inv_freq: np.ndarray) -> np.ndarray:
    """The per-dimension divisors llama3 rope scaling applies (transformers' formula)."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq.astype(np.float64)
    scaled = np.where(wavelen > original / low, 1.0 / factor, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (original / wavelen - low) / (high - low)
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    scaled = np.where(medium, (1 - smooth) / factor + smooth, scaled)
    return 1.0 / scaled


def reproduces(scaling: dict[str, Any], factors: np.ndarray, inv_freq: np.ndarray) -> bool:
    return bool(np.allclose(llama3_factors(scaling, inv_freq), factors, rtol=FACTOR_RTOL, atol=0.0))


def _solve(factors: np.ndarray, inv_freq: np.ndarray) -> dict[str, Any] | None:
    """Parameters fitted to the dimensions between the two plateaus (None: fewer than two)."""
    factor = float(factors.max())
    medium = (factors > 1 + FACTOR_RTOL) & (factors < factor * (1 - FACTOR_RTOL))
    if factor <= 1 or int(medium.sum()) < 2:
        return None
    # smooth = (1/f - 1/factor) / (1 - 1/factor) is linear in 1/wavelen:
    # smooth = original/(high-low) * (1/wavelen) - low/(high-low).
    smooth = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    inverse_wavelen = inv_freq[medium].astype(np.float64) / (2 * math.pi)
    slope, intercept = np.polyfit(inverse_wavelen, smooth, 1)
    if slope <= 0 or intercept >= 0:
        return None
    low_wavelen = -slope / intercept  # original / low_freq_factor
    high_wavelen = slope / (1 - intercept)  # original / high_freq_factor
    original = max(1, round(low_wavelen))
    return {
        "factor": factor,
        "low_freq_factor": original / low_wavelen,
        "high_freq_factor": original / high_wavelen,
        "original_max_position_embeddings": original,
    }


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, rotary_dim: int, name: str) -> dict[str, Any] | None:
    """The `rope_scaling` that reproduces `factors` (None when every factor is 1: plain rope);
    ExportError naming `name` when no llama3 parameters reproduce them."""
    inv_freq = default_inv_freq(rope_theta, rotary_dim)
    if factors.shape != inv_freq.shape:
        raise ExportError(
            f"source: {name}: {ROPE_FREQS_TENSOR} has {factors.size} factors, but the rotary dimension "
            f"{rotary_dim} needs {inv_freq.size}",
            field="source",
        )
    if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ExportError(f"source: {name}: {ROPE_FREQS_TENSOR} holds non-positive or non-finite factors", field="source")
    if np.allclose(factors, 1.0, rtol=0.0, atol=FACTOR_RTOL):
        return None
    candidates = [*LLAMA3_ROPE_PRESETS.values()]
    solved = _solve(factors, inv_freq)
    if solved is not None:
        candidates.append(solved)
    for candidate in candidates:
        if reproduces(candidate, factors, inv_freq):
            return {"rope_type": "llama3", **candidate}
    raise ExportError(
        f"source: {name}: {ROPE_FREQS_TENSOR} (factors {float(factors.min()):g}..{float(factors.max()):g}) matches no "
        f"Llama 3 rope scaling (tried {', '.join(LLAMA3_ROPE_PRESETS)} and a fit), so the rotary table cannot be rebuilt",
        field="source",
    )


def check_saved_rope(config_dir: Path, factors: np.ndarray, name: str) -> None:
    """ExportError unless transformers' rope init, run on the saved config, gives the plain
    inverse frequencies divided by `factors` (the tensor's own definition)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    inv_freq, _attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    plain, _ = ROPE_INIT_FUNCTIONS["default"](config, "cpu")
    expected = plain.numpy().astype(np.float64) / factors.astype(np.float64)
    if inv_freq.shape != plain.shape or not np.allclose(inv_freq.numpy(), expected, rtol=FACTOR_RTOL, atol=0.0):
        raise ExportError(
            f"source: {name}: the saved config's rope ({rope_type}) does not reproduce {ROPE_FREQS_TENSOR}",
            field="source",
        )
