"""Model sources: local Hugging Face folders, GGUF files, package:NAME and .onnx files."""

from appliance.export.sources.base import (
    ResolvedSource,
    Source,
    SourceOptions,
    get_source,
    register_source,
    resolve,
    sha256_files,
)

__all__ = ["ResolvedSource", "Source", "SourceOptions", "get_source", "register_source", "resolve", "sha256_files"]
