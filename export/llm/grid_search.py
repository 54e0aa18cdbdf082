"""4-bit codes for fp32 weights by a per-block scale search, in MatMulNBits' symmetric form.

Why not ONNX Runtime's quantiser for every 4-bit MatMul: it rounds each block to the nearest
code on the grid whose step is the block's largest-magnitude value / -8 (that value takes code
0). That step is rarely the best one: the grid is spread to fit one outlier, and every other
weight pays for it. Trying a few steps per block and refining the best one by least squares
lowers the weight error of SmolLM2-135M's 4-bit MatMuls by 11% in blocks of 32, its
perplexity from +7.3% to +6.4% over fp32 and raises its greedy agreement with fp32 from 0.26 to
0.33, at the same bytes and kernel; searching each block's zero point as well brings the
perplexity to +4.3%. (In blocks of 64 the scale search lowered the weight error too, but not
the perplexity: docs/BENCHMARKS.md.)

By default the codes stay symmetric (zero point 8, MatMulNBits' default), so each matrix is
one MatMulNBits without a zero-point input. With `zero_points` each block may also move its
zero point (a whole number of steps, 0..15), so a block whose weights lean to one side spends
all 16 codes on the range it has. That costs nothing at run time on the CPU: ONNX Runtime's
kernel keeps a per-block fp32 sum that already carries the zero point, with or without one in
the graph (bench/mlas_packing.py; the heap a loaded session adds is the same). Both forms are
written by the source-grid path's encoder (grid_exact.encode_grid_exact).

Never imports torch.
"""

from __future__ import annotations

import numpy as np

from appliance.export.llm.grid_exact import DEFAULT_ZERO_POINT, GRID_LEVELS, GridBlocks

#: Where a block's largest-magnitude value lands, in steps, for each candidate step: -8 is
#: round-to-nearest as ONNX Runtime and ggml's Q4_0 do; -8.5 clips that value by half a step
#: to refine the rest; positive targets put it at the top code (7) instead of the bottom.
#: Five candidates and one least-squares refinement were within 0.1% of 22 candidates' error
#: on SmolLM2's MLP weights, in less than half the time.
CANDIDATE_TARGETS = (-8.0, -8.5, -7.5, 7.5, 7.0)
#: Rows of a weight's transpose searched at once: bounds the float32 temporaries to a few
#: hundred MB for the widest matrices (an LM head of 150k rows).
ROWS_PER_CHUNK = 4096
#: Asymmetric candidates: the share of the block's range below and above zero kept before the
#: 15 steps are laid over it (1.0 keeps the lowest / highest value; less clips it to refine
#: the rest, as the symmetric targets past -8 do).
CANDIDATE_RANGES = ((1.0, 1.0), (0.95, 0.95), (0.9, 0.9), (1.0, 0.9), (0.9, 1.0))


def search_grid(weight: np.ndarray, block_size: int, *, zero_points: bool = False) -> GridBlocks:
    """The 4-bit grid of a [K, N] MatMul weight: per block of `block_size` inputs, the step
    among the candidates with the least squared error, refined once by least squares; with
    `zero_points`, the better of that symmetric grid and the best asymmetric one (integer zero
    point) per block. K must be a multiple of the block size (the caller picks one that
    divides it)."""
    k_dim, n_dim = weight.shape
    if k_dim % block_size:
        raise ValueError(f"K {k_dim} is not a multiple of the block size {block_size}")
    codes = np.empty((n_dim, k_dim // block_size, block_size), dtype=np.uint8)
    scales = np.empty((n_dim, k_dim // block_size), dtype=np.float32)
    mins = np.empty((n_dim, k_dim // block_size), dtype=np.float32)
    rows = np.ascontiguousarray(weight.T, dtype=np.float32)
    for start in range(0, n_dim, ROWS_PER_CHUNK):
        blocks = rows[start : start + ROWS_PER_CHUNK].reshape(-1, k_dim // block_size, block_size)
        step, signed, error = _best_steps(blocks)
        point = np.full(step.shape, DEFAULT_ZERO_POINT, dtype=np.float32)
        if zero_points:
            shifted_step, shifted_point, shifted_signed, shifted_error = _best_shifted(blocks)
            better = shifted_error < error
            step = np.where(better, shifted_step, step)
            point = np.where(better, shifted_point, point)
            signed = np.where(better[..., None], shifted_signed, signed)
        codes[start : start + len(blocks)] = (signed + point[..., None]).astype(np.uint8)
        scales[start : start + len(blocks)] = step
        mins[start : start + len(blocks)] = -point * step
    return GridBlocks(codes=codes, scales=scales, mins=mins)


def _best_steps(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: the chosen step, the signed codes (-8..7) on it and their squared error."""
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    best_step = largest / np.float32(CANDIDATE_TARGETS[0])
    best_error = np.full(largest.shape, np.inf, dtype=np.float32)
    for target in CANDIDATE_TARGETS:
        step = _refined(blocks, largest / np.float32(target), DEFAULT_ZERO_POINT, positive=False)
        error = _squared_error(blocks, step, DEFAULT_ZERO_POINT)
        better = error < best_error
        best_step = np.where(better, step, best_step)
        best_error = np.where(better, error, best_error)
    return best_step.astype(np.float32), _codes(blocks, best_step, DEFAULT_ZERO_POINT), best_error


def _best_shifted(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per block: the best asymmetric grid among CANDIDATE_RANGES, its step refined once by
    least squares with its zero point fixed: (step, zero point 0..15, codes minus zero point,
    squared error)."""
    low = np.minimum(blocks.min(axis=-1), 0)
    high = np.maximum(blocks.max(axis=-1), 0)
    best_step = np.zeros(low.shape, dtype=np.float32)
    best_point = np.full(low.shape, DEFAULT_ZERO_POINT, dtype=np.float32)
    best_error = np.full(low.shape, np.inf, dtype=np.float32)
    for keep_low, keep_high in CANDIDATE_RANGES:
        step = ((high * keep_high - low * keep_low) / (GRID_LEVELS - 1)).astype(np.float32)
        safe = np.where(step > 0, step, 1).astype(np.float32)
        point = np.clip(np.rint(-low * keep_low / safe), 0, GRID_LEVELS - 1).astype(np.float32)
        step = _refined(blocks, step, point, positive=True)
        error = _squared_error(blocks, step, point)
        better = error < best_error
        best_step = np.where(better, step, best_step)
        best_point = np.where(better, point, best_point)
        best_error = np.where(better, error, best_error)
    return best_step, best_point, _codes(blocks, best_step, best_point), best_error


def _refined(blocks: np.ndarray, step: np.ndarray, point: np.ndarray | int, *, positive: bool) -> np.ndarray:
    """The least-squares step for the codes that `step` and `point` give, the point kept:
    sum(w q) / sum(q q) per block (q the codes minus the point). `positive`: a fit that would
    turn the step negative keeps the old step (an asymmetric grid's range is laid out upwards)."""
    codes = _codes(blocks, step, point)
    energy = np.square(codes).sum(axis=-1)
    fitted = (blocks * codes).sum(axis=-1) / np.where(energy > 0, energy, 1)
    keep = (energy > 0) & (fitted > 0) if positive else energy > 0
    return np.where(keep, fitted, step).astype(np.float32)


def _squared_error(blocks: np.ndarray, step: np.ndarray, point: np.ndarray | int) -> np.ndarray:
    return np.square(_codes(blocks, step, point) * step[..., None] - blocks).sum(axis=-1)


def _codes(blocks: np.ndarray, step: np.ndarray, point: np.ndarray | int) -> np.ndarray:
    """Nearest codes minus the zero point (each code in 0..15: -8..7 for the default point 8);
    a block whose step is 0 (all zeros) gets 0."""
    safe = np.where(step != 0, step, 1).astype(np.float32)
    point = np.asarray(point, dtype=np.float32)[..., None]
    return np.clip(np.rint(blocks / safe[..., None]), -point, GRID_LEVELS - 1 - point)
