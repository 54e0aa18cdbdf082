"""Checking a published model version before ONNX Runtime reads a byte of it.

A version folder may only be read when its model file and every external-data file it names
are regular files (no symlinks) inside the version folder, and each external tensor's
offset/length lies within its file. The graph's inputs and outputs must match the manifest.
Never loads models from anywhere but the repository; never follows a symlink.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import AttributeProto, GraphProto, TensorProto

from appliance.errors import ModelRejected
from appliance.repository.store import ModelVersion
from appliance.repository.tensors import ORT_TYPES


def _tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor of a graph, its nodes' attributes and subgraphs (iteratively)."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield from current.initializer
        for sparse in current.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in current.node:
            for attribute in node.attribute:
                if attribute.type == AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == AttributeProto.TENSORS:
                    yield from attribute.tensors
                elif attribute.type == AttributeProto.GRAPH:
                    stack.append(attribute.g)
                elif attribute.type == AttributeProto.GRAPHS:
                    stack.extend(attribute.graphs)


#: Bytes per element of the tensor types a model may store; 4-bit types count half a byte.
_ELEMENT_BYTES: dict[int, float] = {
    TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.UINT16: 2,
    TensorProto.INT16: 2, TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1,
    TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.UINT32: 4, TensorProto.UINT64: 8,
    TensorProto.BFLOAT16: 2, TensorProto.UINT4: 0.5, TensorProto.INT4: 0.5,
}


def _declared_bytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's dims and type promise, or None for types without a fixed size."""
    per_element = _ELEMENT_BYTES.get(tensor.data_type)
    if per_element is None:
        return None
    if any(dim < 0 for dim in tensor.dims):
        raise ModelRejected(f"tensor {tensor.name!r}: negative dimension in {list(tensor.dims)}")
    count = 1
    for dim in tensor.dims:
        count *= dim
    return int(-(-count * per_element // 1))


def _check_stored_size(tensor: TensorProto, stored_bytes: int) -> None:
    """The bytes a tensor stores must be the bytes its shape declares: a tensor declaring
    terabytes over a few stored bytes is refused here, before anyone allocates for it."""
    declared = _declared_bytes(tensor)
    if declared is not None and declared != stored_bytes:
        raise ModelRejected(
            f"tensor {tensor.name!r}: shape {list(tensor.dims)} declares {declared} bytes but {stored_bytes} are stored"
        )


def _inside(folder: Path, relative: str, what: str) -> Path:
    """`relative` resolved inside `folder`, refusing absolute paths, '..' escapes and symlinks."""
    if not relative or os.path.isabs(relative) or "\x00" in relative:
        raise ModelRejected(f"{what}: location {relative!r} must be a relative path inside the version folder")
    candidate = folder / relative
    # Walk each component so a symlinked directory on the way is refused too.
    current = folder
    for part in Path(relative).parts:
        if part in ("..", "."):
            raise ModelRejected(f"{what}: location {relative!r} leaves the version folder")
        current = current / part
        if current.is_symlink():
            raise ModelRejected(f"{what}: {relative!r} is a symbolic link; links are refused")
    resolved = candidate.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ModelRejected(f"{what}: location {relative!r} leaves the version folder")
    if not resolved.is_file():
        raise ModelRejected(f"{what}: external data file {relative!r} is missing")
    return resolved


def check_version_files(version: ModelVersion) -> onnx.ModelProto:
    """Validate the version's files; returns the graph without external data loaded."""
    folder = version.path
    if folder.is_symlink():
        raise ModelRejected(f"{version.name}/{version.version}: the version folder is a symbolic link")
    model_path = folder / version.manifest.model_file
    if model_path.is_symlink():
        raise ModelRejected(f"{version.manifest.model_file}: the model file is a symbolic link; links are refused")
    if not model_path.is_file():
        raise ModelRejected(f"{version.manifest.model_file}: the model file is missing")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelRejected(f"{version.manifest.model_file}: not a readable ONNX file ({exc.__class__.__name__})") from None
    sizes: dict[Path, int] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            if tensor.raw_data:
                _check_stored_size(tensor, len(tensor.raw_data))
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        path = _inside(folder, entries.get("location", ""), f"tensor {tensor.name!r}")
        size = sizes.setdefault(path, path.stat().st_size)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else size - offset
        except ValueError:
            raise ModelRejected(f"tensor {tensor.name!r}: offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelRejected(f"tensor {tensor.name!r}: external data range {offset}+{length} exceeds its file ({size} bytes)")
        if "length" in entries:
            _check_stored_size(tensor, length)
        elif (_declared_bytes(tensor) or 0) > length:
            raise ModelRejected(f"tensor {tensor.name!r}: shape {list(tensor.dims)} declares more bytes than its file holds")
    return model


def _shape_conflict(declared: list[int], graph_shape: object) -> str | None:
    """Why a manifest shape cannot describe the graph's, or None when it can.

    The ranks must be equal, and where the graph fixes a dimension the manifest must say the
    same number (or -1). A lying shape would otherwise pass request validation and fail
    every request inside ONNX Runtime."""
    if not isinstance(graph_shape, (list, tuple)):
        return None  # the graph does not declare a shape: nothing to hold the manifest to
    if len(declared) != len(graph_shape):
        return f"rank {len(declared)} {declared}, the graph has rank {len(graph_shape)} {list(graph_shape)}"
    for index, (want, have) in enumerate(zip(declared, graph_shape, strict=True)):
        if isinstance(have, int) and have >= 0 and want not in (-1, have):
            return f"dimension {index} = {want}, the graph fixes it at {have}"
    return None


def check_signature(version: ModelVersion, session_inputs: list[object], session_outputs: list[object]) -> None:
    """The manifest's inputs/outputs must exist in the graph with the same datatype and a
    compatible shape."""
    graph_inputs = {arg.name: ORT_TYPES.get(arg.type) for arg in session_inputs}  # type: ignore[attr-defined]
    graph_outputs = {arg.name: ORT_TYPES.get(arg.type) for arg in session_outputs}  # type: ignore[attr-defined]
    shapes = {arg.name: getattr(arg, "shape", None) for arg in [*session_inputs, *session_outputs]}  # type: ignore[attr-defined]
    for kind, specs, graph in (("input", version.manifest.inputs, graph_inputs), ("output", version.manifest.outputs, graph_outputs)):
        for spec in specs:
            if spec.name not in graph:
                raise ModelRejected(f"manifest {kind} '{spec.name}' is not in the graph (graph has: {', '.join(graph)})")
            if graph[spec.name] != spec.datatype:
                raise ModelRejected(
                    f"manifest {kind} '{spec.name}' says {spec.datatype}, the graph has {graph[spec.name]}"
                )
            conflict = _shape_conflict(list(spec.shape), shapes.get(spec.name))
            if conflict is not None:
                raise ModelRejected(f"manifest {kind} '{spec.name}' declares {conflict}")
    required = set(graph_inputs) - {spec.name for spec in version.manifest.inputs}
    if required:
        raise ModelRejected(f"graph inputs missing from the manifest: {', '.join(sorted(required))}")
