"""The model repository on disk: `models/<name>/<version>/` with manifest.json and report.json.

The contract between the export stage (which writes versions) and the server (which reads
them). Never imports onnxruntime, torch or transformers.
"""

from appliance.repository.manifest import (
    Datatype,
    EmbeddingSpec,
    GenerationSpec,
    Manifest,
    Report,
    SourceInfo,
    Task,
    TensorSpec,
    TokenizerSpec,
    parse_version,
)
from appliance.repository.store import ModelRepository, ModelVersion

__all__ = [
    "Datatype",
    "EmbeddingSpec",
    "GenerationSpec",
    "Manifest",
    "ModelRepository",
    "ModelVersion",
    "Report",
    "SourceInfo",
    "Task",
    "TensorSpec",
    "TokenizerSpec",
    "parse_version",
]
