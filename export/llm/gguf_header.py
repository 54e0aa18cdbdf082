"""A bounded reader for the header of a GGUF file: metadata key/values and tensor table.

Why our own reader: a GGUF header is untrusted input whose length fields (string lengths,
array counts, tensor counts, dimensions) a truncated or hostile file can make lie. Every
length here is checked against the bytes that are actually left before anything is read or
allocated, and every tensor's data range is checked to lie inside the file, so a bad file
gives one clear `ExportError` instead of a numpy/memmap traceback or a huge allocation.
Only after this check does the export hand the file to transformers' GGUF loader.

Must never import torch or transformers, never read tensor data (only its bounds), and never
trust a count it has not bounded by the file size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ExportError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
#: llama.cpp's GGML_MAX_DIMS: a tensor has at most this many dimensions.
MAX_TENSOR_DIMS = 4
DEFAULT_ALIGNMENT_BYTES = 32
#: A key longer than this is not a real key (llama.cpp keys are short dotted names).
MAX_KEY_BYTES = 1 << 16

# GGUF value type codes (the file format's numbering).
_SCALAR_FORMATS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),  # UINT8
    1: ("<b", 1),  # INT8
    2: ("<H", 2),  # UINT16
    3: ("<h", 2),  # INT16
    4: ("<I", 4),  # UINT32
    5: ("<i", 4),  # INT32
    6: ("<f", 4),  # FLOAT32
    7: ("<?", 1),  # BOOL
    10: ("<Q", 8),  # UINT64
    11: ("<q", 8),  # INT64
    12: ("<d", 8),  # FLOAT64
}
_STRING = 8
_ARRAY = 9
#: Smallest number of bytes one item of each type occupies (a string: its 8-byte length).
_MIN_ITEM_BYTES = {**{code: size for code, (_fmt, size) in _SCALAR_FORMATS.items()}, _STRING: 8, _ARRAY: 12}

#: GGML tensor type code -> (name, elements per block, bytes per block), for every type
#: llama.cpp writes (ggml.h's enum ggml_type): the header bounds any of them; which ones the
#: export can dequantise is the GGUF source's decision (sources/gguf.py).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
#: (elements per block, bytes per block) of each GGML type code.
GGML_BLOCK_LAYOUT: dict[int, tuple[int, int]] = {code: (block, size) for code, (_name, block, size) in GGML_TYPES.items()}


def ggml_type_name(code: int) -> str:
    """llama.cpp's name of a GGML tensor type code (e.g. 12 -> "Q4_K"); "type N" if unknown."""
    entry = GGML_TYPES.get(code)
    return entry[0] if entry else f"type {code}"


@dataclass(frozen=True)
class GgufTensorInfo:
    """One entry of the tensor table: where its bytes are and what they hold."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset_bytes: int
    size_bytes: int

    @property
    def type_name(self) -> str:
        """The GGML type's name, e.g. "Q4_K"."""
        return ggml_type_name(self.ggml_type)


@dataclass
class GgufHeader:
    """The parsed, bounds-checked header of one GGUF file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GgufTensorInfo]
    data_offset_bytes: int
    file_size_bytes: int
    types: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def arch_value(self, key: str) -> Any:
        """`<architecture>.<key>` from the metadata (e.g. block_count), or None."""
        return self.metadata.get(f"{self.architecture}.{key}")


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ExportError:
        return ExportError(
            f"source: {self.path.name} is not a valid GGUF file: {what} (at byte {self.pos} of {self.size})",
            field="source",
        )

    def need(self, count: int, what: str) -> None:
        if count < 0 or count > self.size - self.pos:
            raise self.fail(f"{what} needs {count} bytes but only {self.size - self.pos} remain (truncated?)")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.u64(f"{what} length")
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long (limit {limit})")
        self.need(length, what)
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str) -> Any:
        if value_type in _SCALAR_FORMATS:
            fmt, size = _SCALAR_FORMATS[value_type]
            return self.scalar(fmt, size, what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.u32(f"{what} item type")
            count = self.u64(f"{what} item count")
            if item_type not in _MIN_ITEM_BYTES:
                raise self.fail(f"{what} has unknown item type {item_type}")
            # Bound the count by the bytes left before building anything of that length.
            self.need(count * _MIN_ITEM_BYTES[item_type], f"{what} ({count} items)")
            if item_type in _SCALAR_FORMATS:
                fmt, size = _SCALAR_FORMATS[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buffer, self.pos))
                self.pos += count * size
                return values
            return [self.value(item_type, f"{what}[{index}]") for index in range(count)]
        raise self.fail(f"{what} has unknown value type {value_type}")


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse and bounds-check the header of `path`; ExportError(field="source") if it lies."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ExportError(f"source: cannot read {path}: {exc.strerror}", field="source") from None
    if size < 24:
        raise ExportError(f"source: {path.name} is not a GGUF file ({size} bytes; truncated?)", field="source")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return _parse(view, path, size)
        finally:
            view.release()


def _parse(view: memoryview, path: Path, size: int) -> GgufHeader:
    cursor = _Cursor(view, path)
    cursor.need(4, "magic")
    if bytes(view[:4]) != GGUF_MAGIC:
        raise ExportError(f"source: {path.name} is not a GGUF file (bad magic {bytes(view[:4])!r})", field="source")
    cursor.pos = 4
    version = cursor.u32("version")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise cursor.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
    tensor_count = cursor.u64("tensor count")
    kv_count = cursor.u64("metadata count")
    # Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor entry at
    # least 8 + 4 + 4 + 8 + 8: bound both counts before looping over them.
    cursor.need(kv_count * 13, f"{kv_count} metadata entries")
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    for _ in range(kv_count):
        key = cursor.string("metadata key", limit=MAX_KEY_BYTES)
        value_type = cursor.u32(f"type of {key!r}")
        metadata[key] = cursor.value(value_type, key)
        types[key] = value_type
    cursor.need(tensor_count * 32, f"{tensor_count} tensor entries")
    tensors: list[GgufTensorInfo] = []
    for index in range(tensor_count):
        name = cursor.string(f"name of tensor {index}", limit=MAX_KEY_BYTES)
        n_dims = cursor.u32(f"rank of tensor {name!r}")
        if n_dims == 0 or n_dims > MAX_TENSOR_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_TENSOR_DIMS} allowed)")
        dims = tuple(cursor.u64(f"dimension of {name!r}") for _ in range(n_dims))
        ggml_type = cursor.u32(f"type of tensor {name!r}")
        offset = cursor.u64(f"offset of tensor {name!r}")
        layout = GGML_BLOCK_LAYOUT.get(ggml_type)
        if layout is None:
            raise cursor.fail(f"tensor {name!r} has unknown GGML type code {ggml_type}")
        elements = 1
        for dim in dims:
            elements *= dim
        block_elements, block_bytes = layout
        if dims[0] % block_elements:
            raise cursor.fail(f"tensor {name!r} row of {dims[0]} is not a multiple of its block size {block_elements}")
        tensors.append(
            GgufTensorInfo(name, dims, ggml_type, offset, elements // block_elements * block_bytes)
        )
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT_BYTES)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cursor.pos // alignment) * alignment
    for tensor in tensors:
        end = data_offset + tensor.offset_bytes + tensor.size_bytes
        if end > size:
            raise ExportError(
                f"source: {path.name} is truncated: tensor {tensor.name!r} ends at byte {end} "
                f"but the file has {size} bytes",
                field="source",
            )
    return GgufHeader(
        path=path,
        version=version,
        metadata=metadata,
        tensors=tensors,
        data_offset_bytes=data_offset,
        file_size_bytes=size,
        types=types,
    )
