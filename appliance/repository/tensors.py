"""KServe V2 datatypes and their numpy / ONNX Runtime counterparts, and input checking.

One table decides how each protocol datatype is stored, so the JSON path, the binary path and
the session agree. Checking a request tensor against the manifest's TensorSpec lives here too,
so every error names the input. It sits beside the manifest (whose TensorSpecs speak these
datatypes) so that the V2 routes and the runtime both read it without the routes importing the
runtime. Never imports onnxruntime (the type strings are plain text).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from appliance.errors import InvalidInput
from appliance.repository.manifest import TensorSpec

#: KServe datatype -> numpy dtype (BYTES is an object array of `bytes`).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

#: ONNX Runtime's type strings (`NodeArg.type`) -> KServe datatype.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

INTEGER_TYPES = frozenset({"UINT8", "INT8", "INT16", "INT32", "INT64"})
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(spec: TensorSpec, shape: tuple[int, ...], *, batched: bool) -> None:
    """Refuse a shape that does not fit the declared one (-1 matches any size).

    With `batched`, the request carries a leading batch dimension that the manifest also
    declares (as -1), so the check is the same; the batch size limit is checked by the caller.
    """
    del batched
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input '{spec.name}': expected {len(spec.shape)} dimensions {spec.shape}, got shape {list(shape)}",
            field=spec.name,
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if got < 0:
            raise InvalidInput(f"input '{spec.name}': negative dimension {got}", field=spec.name)
        if want != -1 and want != got:
            raise InvalidInput(
                f"input '{spec.name}': dimension {axis} must be {want}, got {got} (shape {list(shape)})",
                field=spec.name,
            )


def check_inputs(specs: list[TensorSpec], tensors: Mapping[str, np.ndarray]) -> None:
    """Every declared input present, nothing undeclared, shapes fit, batch sizes agree."""
    declared = {spec.name for spec in specs}
    for name in tensors:
        if name not in declared:
            raise InvalidInput(
                f"input '{name}' is not an input of this model (inputs: {', '.join(sorted(declared))})", field=name
            )
    for spec in specs:
        if spec.name not in tensors:
            raise InvalidInput(f"input '{spec.name}' is missing", field=spec.name)
        check_shape(spec, tuple(tensors[spec.name].shape), batched=True)


def from_json_data(spec_name: str, datatype: str, shape: list[int], data: object) -> np.ndarray:
    """A numpy array from a V2 JSON `data` field (flat or nested), typed and shaped."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{spec_name}': unknown datatype {datatype!r}", field=spec_name)
    flat = _flatten(spec_name, data)
    expected = element_count(shape)
    if len(flat) != expected:
        raise InvalidInput(
            f"input '{spec_name}': shape {shape} needs {expected} elements, data has {len(flat)}", field=spec_name
        )
    if datatype == "BYTES":
        values = []
        for item in flat:
            if isinstance(item, str):
                values.append(item.encode("utf-8"))
            elif isinstance(item, bytes):
                values.append(item)
            else:
                raise InvalidInput(f"input '{spec_name}': BYTES elements must be strings", field=spec_name)
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    for item in flat:
        if isinstance(item, str) or item is None or isinstance(item, (list, dict)):
            raise InvalidInput(
                f"input '{spec_name}': {datatype} data must be numbers, found {type(item).__name__}", field=spec_name
            )
        if datatype == "BOOL" and not isinstance(item, bool):
            raise InvalidInput(f"input '{spec_name}': BOOL data must be true/false", field=spec_name)
        if datatype in INTEGER_TYPES and isinstance(item, float) and not item.is_integer():
            raise InvalidInput(f"input '{spec_name}': {datatype} data must be integers", field=spec_name)
    try:
        if datatype in INTEGER_TYPES:
            info = np.iinfo(dtype)
            for item in flat:
                if not info.min <= item <= info.max:
                    raise InvalidInput(f"input '{spec_name}': value {item} out of range for {datatype}", field=spec_name)
        array = np.asarray(flat, dtype=dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInput(f"input '{spec_name}': {exc}", field=spec_name) from None
    return array.reshape(shape)


def _flatten(name: str, data: object) -> list[object]:
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': data must be a list", field=name)
    if not data or not isinstance(data[0], list):
        return data
    flat: list[object] = []
    stack = [data]
    # Iterative flattening: a hostile deeply nested list must not hit the recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def from_binary(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
    """A numpy array from the binary tensor data extension's raw bytes."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}", field=name)
    expected = element_count(shape)
    if datatype == "BYTES":
        items = _split_bytes(name, bytes(raw))
        if len(items) != expected:
            raise InvalidInput(f"input '{name}': shape {shape} needs {expected} elements, got {len(items)}", field=name)
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    if len(raw) != expected * dtype.itemsize:
        raise InvalidInput(
            f"input '{name}': shape {shape} of {datatype} needs {expected * dtype.itemsize} bytes, got {len(raw)}",
            field=name,
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input '{name}': truncated BYTES element length", field=name)
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input '{name}': BYTES element runs past the data", field=name)
        items.append(raw[offset : offset + length])
        offset += length
    return items


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    """Raw little-endian bytes of `array` for the binary extension (BYTES: length-prefixed)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(len(data).to_bytes(4, "little"))
            parts.append(data)
        return b"".join(parts)
    dtype = NUMPY_DTYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def to_json_data(array: np.ndarray, datatype: str) -> list[object]:
    """A flat JSON-ready list (BYTES become UTF-8 strings, undecodable bytes are escaped)."""
    if datatype == "BYTES":
        return [
            item.decode("utf-8", errors="backslashreplace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    return array.reshape(-1).tolist()


def coerce(array: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """Cast an array the server built itself (tokenised ids) to the declared datatype."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None or datatype == "BYTES":
        raise InvalidInput(f"input '{name}': cannot feed {datatype}", field=name)
    return array.astype(dtype, copy=False)
