"""Shared plumbing of the variant classes: loading a reference model with its weights and
saving a result the way the repository expects (one model.onnx, external data only when the
protobuf limit requires it). Never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from appliance.export.tasks.base import Artifact

#: Above this many bytes of weights a model is saved with external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
EXTERNAL_DATA_SUFFIX = ".data"


def needs_external_data(reference: Artifact) -> bool:
    return reference.size_bytes > EXTERNAL_DATA_THRESHOLD_BYTES


def save_model(model: onnx.ModelProto, out_dir: Path, model_file: str, external: bool) -> Path:
    """Write `model` as out_dir/model_file (+ model_file.data when `external`)."""
    path = out_dir / model_file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{model_file}{EXTERNAL_DATA_SUFFIX}",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def pooling_node_names(model: onnx.ModelProto, prefix: str = "pooling/") -> list[str]:
    """Nodes of the fused pooling piece, which variants keep in fp32 (its epsilons underflow
    in fp16 and it has no weights worth quantising)."""
    return [node.name for node in model.graph.node if node.name.startswith(prefix)]


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice through the root logger at WARNING; the export's
    progress display is the user's interface, so those lines are held back while it runs."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)
