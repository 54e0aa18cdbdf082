"""Source: an existing `.onnx` file of any kind (vision, tabular, ... brought by a user).

The file is checked (onnx.checker; external data must be plain files inside the model's folder,
no symlinks) and hashed together with its external data. Never runs the model.
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.sources.base import ResolvedSource, Source, SourceOptions, register_source, sha256_files


@register_source
class OnnxFileSource(Source):
    kind = "onnx"
    priority = 20

    def claims(self, spec: str) -> bool:
        return spec.lower().endswith(".onnx")

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedSource:
        given = Path(spec).expanduser()
        if not given.exists():
            raise ExportError(f"source: path not found: {spec}", field="source")
        if given.is_symlink():
            raise ExportError(f"source: {spec} is a symlink; pass the real file", field="source")
        path = given.resolve()
        if not path.is_file():
            raise ExportError(f"source: {spec} is not a file", field="source")
        model = onnx_tools.check_model(path)
        external = onnx_tools.check_external_data(model, path.parent)
        return ResolvedSource(
            kind="onnx",
            format="onnx",
            uri=str(path),
            path=path,
            sha256=sha256_files([path, *external], root=path.parent),
            config=None,
            weight_files=(path, *external),
            details={"external_data": [p.name for p in external]},
            options=options,
        )
