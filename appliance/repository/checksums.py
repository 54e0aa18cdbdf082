"""SHA-256 of every file of a published model version, for copying versions between nodes.

Why: in scale-out copy mode (docs/SCALE.md) a node other than the repository's receives a
version's files through Ray and must know, before it serves one byte of them, that they are
the repository's. The digests are computed on the repository's side and cached next to the
version folder, in `<name>/.<version>.sha256.json`, keyed by each file's size, mtime and inode:
a multi-GB model is hashed once, not at every replica start, and a file rewritten in place (a
manifest whose default flag changed) is hashed again. The cache is a hint only: a stale or
unreadable one is recomputed, and a read-only repository simply goes without it.

Never imports onnxruntime or Ray; never writes inside a version folder (it appears only complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

#: Bytes read at a time while hashing (bounded memory for multi-GB files).
HASH_BLOCK_BYTES = 1 << 20
CACHE_FORMAT = 1


@dataclass(frozen=True)
class FileDigest:
    """One file of a version: its size and SHA-256 (hex)."""

    size_bytes: int
    sha256: str


def digest_cache_path(version_dir: Path) -> Path:
    """Where the digests of `version_dir` are cached: beside it, hidden (never a version)."""
    return version_dir.parent / f".{version_dir.name}.sha256.json"


def check_relative(path: str) -> PurePosixPath:
    """`path` as a file inside a version folder; ValueError for anything that could leave it
    (absolute, `..`, empty parts): a receiving node writes files under these names."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"not a file inside a model version: {path!r}")
    return pure


def version_files(version_dir: Path) -> list[str]:
    """Every regular file of a version, as sorted relative POSIX paths (symlinks are skipped:
    a version is self-contained)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(version_dir):
        dirnames[:] = [name for name in dirnames if not os.path.islink(os.path.join(dirpath, name))]
        for filename in filenames:
            full = Path(dirpath) / filename
            if full.is_file() and not full.is_symlink():
                found.append(full.relative_to(version_dir).as_posix())
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def version_digests(version_dir: Path) -> dict[str, FileDigest]:
    """{relative path: digest} of every file of the version, from the cache where a file's
    size, mtime and inode are unchanged; the cache is rewritten when anything was hashed."""
    cache_path = digest_cache_path(version_dir)
    cached = _read_cache(cache_path)
    entries: dict[str, dict[str, object]] = {}
    digests: dict[str, FileDigest] = {}
    hashed = False
    for relative in version_files(version_dir):
        stat = (version_dir / relative).stat()
        key = {"size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
        known = cached.get(relative)
        if known is not None and all(known.get(name) == value for name, value in key.items()) and isinstance(known.get("sha256"), str):
            sha = str(known["sha256"])
        else:
            sha = sha256_file(version_dir / relative)
            hashed = True
        entries[relative] = {**key, "sha256": sha}
        digests[relative] = FileDigest(stat.st_size, sha)
    if hashed or set(cached) != set(entries):
        _write_cache(cache_path, entries)
    return digests


def _read_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {name: entry for name, entry in data["files"].items() if isinstance(entry, dict)}


def _write_cache(path: Path, entries: dict[str, dict[str, object]]) -> None:
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(json.dumps({"format": CACHE_FORMAT, "files": entries}, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as exc:  # a read-only repository: hash again next time
        temporary.unlink(missing_ok=True)
        log.debug("cannot cache the checksums of %s: %s", path.parent, exc)
