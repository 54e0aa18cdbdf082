"""Source: a local Hugging Face model folder (config.json + safetensors weights).

Checks what can be checked without loading the model: config.json parses, weights exist, each
safetensors file is complete (its header and the data it promises fit the file), and pickle
weights (`*.bin`, `*.pt`, `*.pth`) are refused unless the user trusts them, because
unpickling runs code. Never imports torch or transformers.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from appliance.errors import ExportError
from appliance.export.sources.base import ResolvedSource, Source, SourceOptions, register_source, sha256_files

SAFETENSORS_GLOB = "*.safetensors"
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
#: A safetensors header larger than this is corrupt, not a model.
SAFETENSORS_MAX_HEADER_BYTES = 100 << 20
#: Bytes per element of the safetensors dtypes (others are not size-checked).
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file (header + promised data must fit)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ExportError(f"source: {path.name} is truncated (no safetensors header)", field="source")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(SAFETENSORS_MAX_HEADER_BYTES, size - 8):
            raise ExportError(f"source: {path.name} is truncated or not safetensors (header length)", field="source")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ExportError(f"source: {path.name} has a corrupt safetensors header", field="source") from None
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(value) for value in entry["data_offsets"])
            shape = [int(dim) for dim in entry["shape"]]
            per_element = SAFETENSORS_DTYPE_BYTES.get(str(entry["dtype"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ExportError(f"source: {path.name} has a corrupt safetensors header", field="source") from None
        if begin < 0 or end < begin or any(dim < 0 for dim in shape):
            raise ExportError(f"source: {path.name}: tensor {key!r} has impossible offsets or shape", field="source")
        if per_element is not None and math.prod(shape) * per_element != end - begin:
            # A header that lies about a shape would make the loader allocate what it says.
            raise ExportError(
                f"source: {path.name}: tensor {key!r} declares shape {shape} ({math.prod(shape) * per_element} bytes) "
                f"over {end - begin} stored bytes",
                field="source",
            )
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        raise ExportError(
            f"source: {path.name} is truncated: {size} bytes, the header promises {8 + header_len + data_end}",
            field="source",
        )


def read_config(folder: Path) -> dict[str, object]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"source: {folder / 'config.json'} is not valid JSON ({exc.msg})", field="source") from None
    if not isinstance(config, dict):
        raise ExportError(f"source: {folder / 'config.json'} is not a JSON object", field="source")
    return config


def resolve_folder(folder: Path, uri: str, options: SourceOptions, kind: str = "hf-folder") -> ResolvedSource:
    """Check and hash a Hugging Face folder (shared with package:NAME)."""
    if not (folder / "config.json").is_file():
        raise ExportError(
            f"source: {folder} is not a model folder: config.json is missing", field="source"
        )
    config = read_config(folder)
    safetensors = sorted(p for p in folder.glob(SAFETENSORS_GLOB) if p.is_file())
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if not safetensors and pickles and not options.trust_pickle:
        raise ExportError(
            f"source: {folder} has only pickle weights ({pickles[0].name}); unpickling can run code. "
            "Convert them to safetensors, or pass --trust-pickle if you trust the file",
            field="source",
        )
    weights = safetensors or (pickles if options.trust_pickle else [])
    if not weights:
        raise ExportError(f"source: {folder} has config.json but no *.safetensors weights", field="source")
    for path in safetensors:
        check_safetensors(path)
    return ResolvedSource(
        kind=kind,  # type: ignore[arg-type]
        format="hf-folder",
        uri=uri,
        path=folder,
        sha256=sha256_files(weights, root=folder),
        config=config,
        weight_files=tuple(weights),
        details={"pickle_weights": not safetensors},
        options=options,
    )


@register_source
class HfFolderSource(Source):
    """A folder with config.json (anything else that is a folder is 'not a model')."""

    kind = "hf-folder"
    priority = 90

    def claims(self, spec: str) -> bool:
        return Path(spec).expanduser().is_dir()

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedSource:
        folder = Path(spec).expanduser().resolve()
        return resolve_folder(folder, str(folder), options)
