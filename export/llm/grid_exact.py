"""Lossless 4-bit storage for weights that already sit on a GGUF Q4_1 or Q4_0 grid.

A Q4_1 GGUF stores every block of 32 weights as ``d * q + m`` (q in 0..15, one scale d and one
minimum m per block); a Q4_0 GGUF as ``d * (q - 8)``, the same grid with ``m = -8 d``. Dequantised to fp32 and quantised again by ONNX Runtime's quantiser, each
weight is rounded a second time onto a different grid: on SmolLM2-135M that second rounding
alone costs +20% perplexity, which is why the plain int4 recipe has to keep half its MatMuls in
8 bits. Re-encoding the original grid instead costs nothing.

MatMulNBits computes ``scale * (q - zero_point)`` with integer zero points, 8 when the node
has no zero-point input. A Q4_0 block is exactly that form with a signed scale (ggml stores
``d = v / -8`` for the block's largest-magnitude value v, which takes code 0), so a Q4_0 matrix
is one MatMulNBits without zero points (the same codes with positive scales would need zero
points of 7 and 8; bench/matmulnbits_forms.py times both forms alike on ONNX Runtime 1.32, so
the gain is one input fewer, not speed). A Q4_1 minimum is
a float, and MatMulNBits' float zero-point form runs a slow dequantise-then-multiply path (25x
slower at M = 1 on ONNX Runtime 1.32), so there the minimum is split off::

    x @ W  =  MatMulNBits(x; q, d, zero_point 0)  +  blocksum(x) @ m

where ``blocksum(x)`` adds up each block of 32 inputs. The second term is a small fp32 MatMul
(one row per block instead of one per weight); MatMuls that read the same input share one block
sum.

Never imports torch; never changes graph inputs or outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Codes of a 4-bit grid.
GRID_LEVELS = 16
#: Largest distance (in steps of its own block) at which a recovered weight still counts as on
#: the grid; fp32 rounding of ``d * q + m`` stays orders of magnitude below this.
ON_GRID_TOLERANCE = 1e-3
#: MatMulNBits accuracy level 4: int8 activations inside the kernel (the fast CPU path).
ACCURACY_LEVEL = 4
#: The zero point MatMulNBits assumes for 4-bit codes when the node has no zero-point input;
#: also the code of 0.0 on a Q4_0 grid.
DEFAULT_ZERO_POINT = GRID_LEVELS // 2


@dataclass(frozen=True)
class GridBlocks:
    """One weight matrix as 4-bit codes on its own per-block grid (MatMulNBits layout)."""

    codes: np.ndarray  # uint8 [N, blocks, block_size], values 0..15
    scales: np.ndarray  # float32 [N, blocks]
    mins: np.ndarray  # float32 [N, blocks]

    def packed_codes(self) -> np.ndarray:
        """Two codes per byte, the even position in the low nibble (MatMulNBits' B input)."""
        return (self.codes[..., 0::2] | (self.codes[..., 1::2] << 4)).astype(np.uint8)

    def integer_zero_points(self) -> np.ndarray | None:
        """Each block's minimum as a whole number of steps below zero (uint8 [N, blocks],
        0..15), or None when any block's is not: a Q4_0 grid (``d * (q - 8)``) always is, a
        Q4_1 grid's float minimum rarely. With them the matrix is one MatMulNBits, exactly."""
        safe = np.where(self.scales != 0, self.scales, 1.0)
        steps = np.rint(-self.mins / safe)
        exact = np.abs(steps * self.scales + self.mins) <= ON_GRID_TOLERANCE * np.abs(safe)
        if not (exact.all() and (steps >= 0).all() and (steps < GRID_LEVELS).all()):
            return None
        return steps.astype(np.uint8)

    def is_symmetric(self) -> bool:
        """Every block's zero point is MatMulNBits' default (8), so the node needs no
        zero-point input (a block of zeros, whose scale is 0, fits any zero point)."""
        points = self.integer_zero_points()
        return points is not None and bool(np.all((points == DEFAULT_ZERO_POINT) | (self.scales == 0)))


def recover_grid(weight: np.ndarray, block_size: int) -> GridBlocks | None:
    """The 4-bit grid a [K, N] MatMul weight sits on, or None when any block is off-grid.

    First the whole matrix is tried as Q4_0 writes it: each block's step is its
    largest-magnitude value / -8 (negative when that value is positive), that value takes code
    0 and 0.0 code 8; when every block fits, the grid is symmetric (`GridBlocks.is_symmetric`).
    Otherwise each block is tried two ways. As Q4_1 picks its grid: the lowest value is the
    minimum (code 0) and the step is (max - min) / 15. As Q4_0 does with a positive step: the
    step is the largest magnitude / 8, which sits at code 0 when negative (codes span -8..7
    steps) or at code 15 when positive (read as -7..8 steps). A block on neither grid, or whose
    codes do not reach the ends the guess assumed, fails the check.
    """
    k_dim, n_dim = weight.shape
    if k_dim % block_size or block_size % 2:
        return None
    blocks = weight.T.reshape(n_dim, k_dim // block_size, block_size).astype(np.float64)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    step_symmetric = largest / -DEFAULT_ZERO_POINT
    low_symmetric = -DEFAULT_ZERO_POINT * step_symmetric
    codes_symmetric, error_symmetric = _codes(blocks, low_symmetric, step_symmetric)
    if float(error_symmetric.max()) <= ON_GRID_TOLERANCE:
        return GridBlocks(
            codes=codes_symmetric.astype(np.uint8), scales=step_symmetric.astype(np.float32), mins=low_symmetric.astype(np.float32)
        )
    high = blocks.max(axis=-1)
    low_q4_1 = blocks.min(axis=-1)
    step_q4_1 = (high - low_q4_1) / (GRID_LEVELS - 1)
    step_q4_0 = np.maximum(high, -low_q4_1) / (GRID_LEVELS // 2)
    low_q4_0 = np.where(-low_q4_1 >= high, -8.0, -7.0) * step_q4_0
    codes_q4_1, error_q4_1 = _codes(blocks, low_q4_1, step_q4_1)
    codes_q4_0, error_q4_0 = _codes(blocks, low_q4_0, step_q4_0)
    use_q4_1 = error_q4_1 <= error_q4_0
    error = np.where(use_q4_1, error_q4_1, error_q4_0)
    if float(error.max()) > ON_GRID_TOLERANCE:
        return None
    codes = np.where(use_q4_1[..., None], codes_q4_1, codes_q4_0)
    step = np.where(use_q4_1, step_q4_1, step_q4_0)
    low = np.where(use_q4_1, low_q4_1, low_q4_0)
    return GridBlocks(codes=codes.astype(np.uint8), scales=step.astype(np.float32), mins=low.astype(np.float32))


def _codes(blocks: np.ndarray, low: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of `blocks` on the grid `low + step * code` (the step may be negative), and each
    block's largest distance from it in steps (infinite where a code falls outside 0..15)."""
    safe_step = np.where(step != 0, step, 1.0)
    codes = np.rint((blocks - low[..., None]) / safe_step[..., None])
    error = np.abs(codes * step[..., None] + low[..., None] - blocks).max(axis=-1) / np.abs(safe_step)
    in_range = ((codes >= 0) & (codes < GRID_LEVELS)).all(axis=-1)
    return np.clip(codes, 0, GRID_LEVELS - 1), np.where(in_range, error, np.inf)


def grid_exact_candidates(model: onnx.ModelProto, names: list[str], block_size: int) -> dict[str, GridBlocks]:
    """The MatMuls among `names` whose constant weight sits on a 4-bit grid."""
    initializers = {init.name: init for init in model.graph.initializer}
    wanted = set(names)
    found: dict[str, GridBlocks] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in wanted or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.ndim == 2 and weight.dtype == np.float32:
            grid = recover_grid(weight, block_size)
            if grid is not None:
                found[node.name] = grid
    return found


def pack_zero_points(points: np.ndarray) -> np.ndarray:
    """uint8 [N, blocks] -> MatMulNBits' zero_points input: per row, two blocks per byte, the
    even block in the low nibble (a last odd block alone in its byte)."""
    n_dim, blocks = points.shape
    padded = np.zeros((n_dim, blocks + blocks % 2), np.uint8)
    padded[:, :blocks] = points
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1).astype(np.uint8)


def encode_grid_exact(model: onnx.ModelProto, grids: dict[str, GridBlocks], block_size: int) -> int:
    """Replace each MatMul in `grids` by one MatMulNBits: without zero points where the grid is
    symmetric (Q4_0 sources), with integer zero points where every block's minimum is a whole
    number of steps, else in the exact MatMulNBits + block-sum form; returns how many."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    block_sums: dict[str, str] = {}
    replaced: set[str] = set()
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        grid = grids.get(node.name)
        if grid is None:
            rewritten.append(node)
            continue
        source, weight_name = node.input[0], node.input[1]
        replaced.add(weight_name)
        n_dim, blocks, _ = grid.codes.shape
        k_dim = blocks * block_size
        zero_points = grid.integer_zero_points()
        exact = zero_points is not None
        packed_points: np.ndarray | None
        if grid.is_symmetric():
            packed_points = None
        elif zero_points is not None:
            packed_points = pack_zero_points(zero_points)
        else:
            packed_points = np.zeros(n_dim * ((blocks + 1) // 2), dtype=np.uint8)
        codes_output = list(node.output) if exact else [f"{node.name}/codes_output"]
        rewritten.append(_matmul_nbits(graph, node.name, source, weight_name, grid, packed_points, codes_output, k_dim, block_size))
        if exact:
            continue
        if source not in block_sums:
            block_sums[source] = f"{node.name}/BlockSum/output_0"
            rewritten.extend(_block_sum_nodes(graph, node.name, source, blocks, block_size, block_sums[source]))
        prefix = node.name
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grid.mins.T), f"{weight_name}_mins"))
        rewritten.append(helper.make_node("MatMul", [block_sums[source], f"{weight_name}_mins"], [f"{prefix}/mins_output"], name=f"{prefix}/Mins"))
        rewritten.append(helper.make_node("Add", [f"{prefix}/codes_output", f"{prefix}/mins_output"], list(node.output), name=f"{prefix}/AddMins"))
    del graph.node[:]
    graph.node.extend(rewritten)
    used = {name for node in graph.node for name in node.input}
    for name in replaced:
        if name not in used:
            graph.initializer.remove(initializers[name])
    return len(grids)


def _matmul_nbits(
    graph: onnx.GraphProto,
    prefix: str,
    source: str,
    weight_name: str,
    grid: GridBlocks,
    zero_points: np.ndarray | None,
    outputs: list[str],
    k_dim: int,
    block_size: int,
) -> onnx.NodeProto:
    """The 4-bit MatMulNBits over `grid`'s codes and scales with the given packed zero points,
    or without a zero-point input (each block's is then 8), its initializers added to `graph`."""
    inputs = [source, f"{weight_name}_q4", f"{weight_name}_scales"]
    graph.initializer.extend(
        [
            numpy_helper.from_array(grid.packed_codes(), f"{weight_name}_q4"),
            numpy_helper.from_array(grid.scales.reshape(-1), f"{weight_name}_scales"),
        ]
    )
    if zero_points is not None:
        graph.initializer.append(numpy_helper.from_array(zero_points, f"{weight_name}_zero_points"))
        inputs.append(f"{weight_name}_zero_points")
    return helper.make_node(
        "MatMulNBits",
        inputs,
        outputs,
        name=f"{prefix}_Q4",
        domain="com.microsoft",
        K=k_dim,
        N=grid.codes.shape[0],
        bits=4,
        block_size=block_size,
        accuracy_level=ACCURACY_LEVEL,
    )


def _block_sum_nodes(graph: onnx.GraphProto, prefix: str, source: str, blocks: int, block_size: int, output: str) -> list[onnx.NodeProto]:
    """[batch, sequence, K] -> [batch, sequence, K / block_size]: each block of inputs summed
    (decoder graphs feed their MatMuls rank-3 activations)."""
    shape_name = f"{prefix}/BlockSum/shape"
    axes_name = f"{prefix}/BlockSum/axes"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray([0, 0, blocks, block_size], dtype=np.int64), shape_name),
            numpy_helper.from_array(np.asarray([-1], dtype=np.int64), axes_name),
        ]
    )
    return [
        helper.make_node("Reshape", [source, shape_name], [f"{prefix}/BlockSum/blocks"], name=f"{prefix}/BlockSum/Reshape"),
        helper.make_node("ReduceSum", [f"{prefix}/BlockSum/blocks", axes_name], [output], name=f"{prefix}/BlockSum/ReduceSum", keepdims=0),
    ]
