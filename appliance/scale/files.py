"""The repository's side of scale-out copy mode: which files a node needs to serve one model,
with their SHA-256, and those files in bounded chunks.

Why it exists: in copy mode (`scale.model_files = "copy"`, docs/SCALE.md) only the head node
holds the model repository; a replica elsewhere asks `RepositoryFiles` (run on the head by the
`repository` deployment, source.py) what to copy, and fetches it chunk by chunk (mirror.py).
What a model needs is its serving version and, when speculative decoding by draft is on, that
version's draft (generation/drafts.py picks it the same way here as the loader does there).

Never imports Ray (tests run it in-process); never reads outside the repository: a chunk is
served only for a file inside a version folder, never more than `MAX_CHUNK_BYTES` at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.config import Settings
from appliance.errors import ApplianceError, ModelCopyFailed
from appliance.generation.drafts import draft_version_for
from appliance.repository.checksums import FileDigest, check_relative, version_digests
from appliance.repository.manifest import check_model_name
from appliance.repository.store import ModelRepository, ModelVersion

#: Bytes per chunk a node asks for (a multi-GB file never travels as one object).
CHUNK_BYTES = 4 << 20
#: The largest chunk the repository's side answers.
MAX_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Wanted:
    """What a node needs to serve `model`: {version: {relative path: digest}} (empty when the
    model has nothing to serve), which of them serves, and the node that holds the repository
    (a replica there reads the repository itself)."""

    model: str
    serving: int | None
    versions: dict[int, dict[str, FileDigest]]
    source_node: str | None = None


class FileSource(Protocol):
    """Where a node's copy comes from (the `repository` deployment's handle, or the repository
    itself in tests)."""

    async def wanted(self, model: str) -> Wanted: ...

    async def chunk(self, model: str, version: int, path: str, offset: int, size: int) -> bytes: ...


class RepositoryFiles:
    """Answers `FileSource` from the repository on this node."""

    def __init__(self, settings: Settings) -> None:
        self.repository = ModelRepository(settings.models_dir)
        self.speculative = settings.generation.speculative
        # One hashing pass at a time: replicas starting together wait for the first one's
        # digests (then cached) instead of hashing the same multi-GB files in parallel.
        self._hashing = asyncio.Lock()

    async def wanted(self, model: str) -> Wanted:
        versions = await asyncio.to_thread(self._needed, model)
        async with self._hashing:
            digests = {version.version: await asyncio.to_thread(version_digests, version.path) for version in versions}
        return Wanted(model=model, serving=versions[0].version if versions else None, versions=digests)

    def _needed(self, model: str) -> list[ModelVersion]:
        """The serving version first, then its draft if it has one."""
        try:
            serving = self.repository.serving_version(model)
        except ApplianceError:
            return []
        if serving is None:
            return []
        draft = draft_version_for(self.repository, serving, self.speculative)
        return [serving] if draft is None else [serving, draft]

    async def chunk(self, model: str, version: int, path: str, offset: int, size: int) -> bytes:
        """`size` bytes of one file of a version from `offset` (fewer at its end)."""
        if not 0 < size <= MAX_CHUNK_BYTES or offset < 0:
            raise ModelCopyFailed(f"a chunk of {size} bytes at offset {offset} was asked for (at most {MAX_CHUNK_BYTES} bytes)")
        try:
            check_model_name(model)
            relative = check_relative(path)
        except ValueError as exc:
            raise ModelCopyFailed(str(exc)) from None
        file = self.repository.root / model / str(version) / relative
        return await asyncio.to_thread(_read, file, offset, size, f"model {model} version {version}: {path}")


def _read(file: Path, offset: int, size: int, what: str) -> bytes:
    if file.is_symlink() or not file.is_file():
        raise ModelCopyFailed(f"{what} is not in the model repository (any more)")
    with open(file, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
