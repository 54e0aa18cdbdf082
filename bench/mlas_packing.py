"""What ONNX Runtime's CPU MatMulNBits reads per weight: the kernel's packed form, not the
stored codes and scales.

Why: at accuracy level 4 (int8 activations, the fast CPU path) ONNX Runtime 1.32's MLAS kernel
repacks each MatMulNBits weight when the session loads. Besides the codes and one fp32 scale
per block it keeps one more fp32 per block: the block's scale times its zero point (the "block
sum" the int8 kernel subtracts, A's block sum times it, instead of subtracting the zero point
from every code), with N rounded up to 16. A decode step streams all three, so in blocks of 32
a 4-bit weight costs 4 + 1 + 1 = 6 bits against the 5 stored and llama.cpp's Q4_0 at 4.5; in
blocks of 128, 4.5 bits. Counted as stored, the 4-bit kernel looked much slower per byte
than the 8-bit one; counted as packed, most of that gap is bytes (docs/BENCHMARKS.md, "What
the CPU kernel reads").

The layout is read from the kernel's own sizing (codes, fp32 scales, fp32 block sums padded to
16 columns) and checked on this box by `heap_bytes_in_use` around a session's creation
(bench/matmulnbits_blocks.py prints it). Never imported by the appliance.
"""

from __future__ import annotations

import ctypes
import math

#: MatMulNBits' accuracy level whose CPU kernel packs block sums beside the scales.
INT8_COMPUTE_ACCURACY_LEVEL = 4
#: The block sums are stored for N rounded up to this many columns.
BLOCK_SUM_COLUMNS = 16
#: Bytes of one fp32 scale or block sum.
FP32_BYTES = 4


def stored_bytes(k_dim: int, n_dim: int, bits: int, block: int) -> int:
    """Bytes of the node's codes and fp32 scales as the graph stores them (no zero points)."""
    blocks = math.ceil(k_dim / block)
    return n_dim * blocks * (block * bits // 8 + FP32_BYTES)


def packed_bytes(k_dim: int, n_dim: int, bits: int, block: int, accuracy_level: int = INT8_COMPUTE_ACCURACY_LEVEL) -> int:
    """Bytes the CPU kernel keeps, and a one-row product streams, for one MatMulNBits weight."""
    if accuracy_level != INT8_COMPUTE_ACCURACY_LEVEL:
        return stored_bytes(k_dim, n_dim, bits, block)
    blocks = math.ceil(k_dim / block)
    block_sums = math.ceil(n_dim / BLOCK_SUM_COLUMNS) * BLOCK_SUM_COLUMNS * blocks * FP32_BYTES
    return stored_bytes(k_dim, n_dim, bits, block) + block_sums


def packed_bits_per_weight(bits: int, block: int) -> float:
    """Bits a one-row product reads per weight at accuracy level 4 (N a multiple of 16)."""
    return bits + 2 * FP32_BYTES * 8 / block


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def heap_bytes_in_use() -> int:
    """Bytes glibc's allocator has handed out and not got back (small blocks plus mmapped
    ones): what a session's packed weights add, unlike the resident size, which keeps freed
    pages. 0 where glibc's mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)
