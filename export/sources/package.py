"""Source: `package:NAME`, an installed Python package that ships a model in its folder.

The package is located with importlib's finder, never imported (its __init__ may pull heavy
dependencies, e.g. llama-cpp-python). Inside it: a folder with config.json (the package root or
a subfolder such as `model/`) becomes an hf-folder source; a single `.gguf` file is handed to
the registered gguf source; a single `.onnx` file to the onnx source. The manifest records kind
"package" and the uri `package:NAME`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from appliance.errors import ExportError
from appliance.export.sources.base import ResolvedSource, Source, SourceOptions, get_source, register_source
from appliance.export.sources.hf_folder import resolve_folder

PREFIX = "package:"
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: How deep below the package root a model folder or file is looked for.
SEARCH_DEPTH = 2


def package_folder(name: str) -> Path:
    """The installed folder of package `name`, found without importing it."""
    if not _PACKAGE_NAME.match(name):
        raise ExportError(f"source: {PREFIX}{name}: not a Python package name", field="source")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = name.replace("_", "-")
        raise ExportError(
            f"source: package {name!r} is not installed (install it, e.g. pip install --no-deps {hint})",
            field="source",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _within(root: Path, depth: int) -> list[Path]:
    found = [root]
    frontier = [root]
    for _ in range(depth):
        frontier = [c for p in frontier for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith((".", "__"))]
        found.extend(frontier)
    return found


@register_source
class PackageSource(Source):
    kind = "package"
    priority = 10

    def claims(self, spec: str) -> bool:
        return spec.startswith(PREFIX)

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedSource:
        name = spec[len(PREFIX) :].strip()
        root = package_folder(name)
        folders = _within(root, SEARCH_DEPTH)
        model_dirs = [d for d in folders if (d / "config.json").is_file()]
        if model_dirs:
            return resolve_folder(model_dirs[0], spec, options, kind="package")
        for suffix, kind in ((".gguf", "gguf"), (".onnx", "onnx")):
            files = sorted(f for d in folders for f in d.glob(f"*{suffix}") if f.is_file())
            if len(files) > 1:
                raise ExportError(
                    f"source: package {name!r} ships several {suffix} files ({', '.join(f.name for f in files)}); "
                    "pass the file path instead",
                    field="source",
                )
            if files:
                resolved = get_source(kind).resolve(str(files[0]), options)
                return dataclasses.replace(resolved, kind="package", uri=spec)
        raise ExportError(
            f"source: package {name!r} ships no model (no config.json folder, .gguf or .onnx file)",
            field="source",
        )
