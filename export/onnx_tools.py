"""Small ONNX / ONNX Runtime helpers the export stage shares: checking a model file, reading its
signature, opening a CPU session the way the server does, and listing the fusions ONNX Runtime
makes. Never imports torch; never runs a model from outside the folder it was given.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from appliance.errors import ExportError
from appliance.repository import TensorSpec

#: ONNX element types the KServe V2 protocol can carry, and their V2 names.
ONNX_TO_KSERVE: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}

#: Skip dumping ORT's optimised graph (to list fusions) for models larger than this.
FUSION_SCAN_MAX_BYTES = 1 << 30


def load_graph_only(path: Path) -> onnx.ModelProto:
    """The model without its external weights (signature and node reading only)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ExportError(f"source: {path.name} is not a readable ONNX model ({exc})", field="source") from None


def check_external_data(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """Every external-data file the model names, refused unless it is a plain file inside
    `folder` (no absolute paths, no '..', no symlinks)."""
    root = folder.resolve()
    found: list[Path] = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        candidate = folder / location
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ExportError(
                f"source: external data path {location!r} of tensor {tensor.name!r} leaves the model folder",
                field="source",
            )
        if candidate.is_symlink():
            raise ExportError(f"source: external data file {location!r} is a symlink; refused", field="source")
        if not candidate.is_file() or root not in candidate.resolve().parents:
            raise ExportError(f"source: external data file {location!r} is missing", field="source")
        found.append(candidate)
    return sorted(set(found))


def check_model(path: Path) -> onnx.ModelProto:
    """onnx.checker plus the external-data rules; returns the graph (without weights)."""
    if path.is_symlink():
        raise ExportError(f"source: {path.name} is a symlink; pass the real file", field="source")
    model = load_graph_only(path)
    check_external_data(model, path.parent)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - checker raises ValidationError and friends
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"source: {path.name} fails the ONNX checker: {first_line}", field="source") from None
    return model


def _dims(value_info: onnx.ValueInfoProto) -> list[int]:
    shape = value_info.type.tensor_type.shape
    return [dim.dim_value if dim.HasField("dim_value") else -1 for dim in shape.dim]


def tensor_specs(values: list[onnx.ValueInfoProto], initializer_names: set[str] | None = None) -> list[TensorSpec]:
    """KServe tensor specs for graph inputs/outputs (initializers listed as inputs skipped)."""
    specs: list[TensorSpec] = []
    for value in values:
        if initializer_names and value.name in initializer_names:
            continue
        elem = value.type.tensor_type.elem_type
        if elem not in ONNX_TO_KSERVE:
            raise ExportError(
                f"source: tensor {value.name!r} has ONNX type {TensorProto.DataType.Name(elem)}, "
                "which KServe V2 cannot carry",
                field="source",
            )
        specs.append(TensorSpec(name=value.name, datatype=ONNX_TO_KSERVE[elem], shape=_dims(value)))
    return specs


def signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the model at `path` as the manifest declares them."""
    model = load_graph_only(path)
    initializers = {init.name for init in model.graph.initializer}
    return tensor_specs(list(model.graph.input), initializers), tensor_specs(list(model.graph.output))


def opset_of(path: Path) -> int:
    """The default-domain opset the model imports."""
    model = load_graph_only(path)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads and no graph output names: left behind when a
    rewrite replaces the nodes that read them (their bytes in a data file stay where they are)."""
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def open_session(path: Path, threads: int | None = None, optimized_path: Path | None = None) -> "ort.InferenceSession":  # noqa: F821
    """A CPU session with the server's options (sequential, all graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        # EXTENDED: the fusions every machine gets, without layout changes tied to this CPU.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime cannot load {path.name}: {message}", field="model") from None


def runtime_fusions(path: Path) -> dict[str, int]:
    """Operators ONNX Runtime's load-time optimiser adds to the graph (fused kernels such as
    SkipLayerNormalization, Attention, MatMulNBits pass-throughs), with counts. Empty for models
    over FUSION_SCAN_MAX_BYTES, where dumping the optimised graph costs more than it tells."""
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    if size > FUSION_SCAN_MAX_BYTES:
        return {}
    before = op_counts(load_graph_only(path))
    with tempfile.TemporaryDirectory(dir=path.parent.parent) as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        open_session(path, optimized_path=optimized)
        after = op_counts(load_graph_only(optimized))
    return {op: count for op, count in sorted(after.items()) if op not in before}
