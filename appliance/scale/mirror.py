"""A node's own copy of one model (scale-out copy mode, docs/SCALE.md): the versions the
repository says the model needs, copied into a node-local folder and verified by SHA-256.

Why: without a shared mount (NFS), a replica on a node other than the head cannot open the
repository; it copies what it serves instead. The copy folder is a repository of its own
(`<copy_dir>/<name>/<version>/`), so the replica's ModelService reads it exactly as it reads
the shared one, and holds exactly the versions the repository names (the serving version and
its draft), with their manifests as they are there, so it picks the same serving version.

Rules, in the order `sync` applies them, each model under an exclusive lock per node (the
replicas of one model on one node share the copy; loading and the repository watch read it
under a shared lock, so a version is never swapped under a load; a reload after a session ran
out of memory reads without it, and if another replica replaced the version meanwhile that
reload fails, the health check fails, and Ray replaces the replica, which copies anew):
- every file of a wanted version is checked: at a replica's start by hashing it (a copy left by
  an earlier replica, or damaged since, is never trusted), afterwards by its size, mtime and
  inode against what this process hashed;
- a version with a missing, different or extra file is rebuilt in `<copy_dir>/.staging/`:
  files that match are hard-linked, the others fetched from the repository in chunks of
  `files.CHUNK_BYTES` (at most `FETCH_WINDOW` in flight) and hashed as they are written; only
  when every file matches is the folder renamed into place, so a half-copied version is never
  visible; a mismatch after transfer raises ChecksumMismatch naming the file;
- versions the repository no longer names are removed.
Never imports Ray: the source is anything with `FileSource`'s two methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from appliance.config import Settings
from appliance.errors import ChecksumMismatch, ModelCopyFailed
from appliance.repository.checksums import FileDigest, check_relative, sha256_file, version_files
from appliance.repository.manifest import parse_version
from appliance.repository.store import STAGING_DIR, fsync_dir, fsync_tree
from appliance.scale.files import CHUNK_BYTES, FileSource, Wanted
from appliance.serving.service import ModelService
from appliance.serving.watch import RepositoryWatch

log = logging.getLogger("appliance.scale.mirror")

#: A node's own copy folder, overriding `scale.copy_dir` (set in the environment of its `ray start`).
COPY_DIR_ENVIRONMENT = "APPLIANCE_SCALE__COPY_DIR"
#: Chunk requests one copying replica keeps in flight (memory: this many times CHUNK_BYTES).
FETCH_WINDOW = 4
#: How often a replica waiting for another's lock on the copy looks again.
LOCK_POLL_S = 0.1
#: Free disk left beyond a copy's own size before it starts.
DISK_MARGIN_BYTES = 64 << 20
LOCK_FILE = ".lock"
COPY_DIR_MODE = 0o700
#: Separates model, version and a unique tail in staging names ('+' is never in a model name).
_SEPARATOR = "+"


def copy_root(settings: Settings, environ: Mapping[str, str] = os.environ) -> Path:
    """This node's copy folder: its own APPLIANCE_SCALE__COPY_DIR, else the settings' (which
    come from the head: a node's disks are its own business)."""
    own = environ.get(COPY_DIR_ENVIRONMENT)
    return Path(own) if own else settings.node_models_dir


@dataclass
class SyncReport:
    """What one `sync` did: files fetched (`version/path`), which of them were there but did
    not match, versions removed, bytes transferred."""

    fetched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    bytes_copied: int = 0


@dataclass
class _Check:
    good: list[str]
    missing: list[str]
    mismatched: list[str]
    extra: bool


class NodeMirror:
    """One model's copy on this node, kept equal to what the repository names."""

    def __init__(self, root: Path, model: str, source: FileSource) -> None:
        self.root = root
        self.model = model
        self.source = source
        #: (version, path) -> (size, mtime_ns, inode, sha256) of the files this process hashed.
        self._verified: dict[tuple[int, str], tuple[int, int, int, str]] = {}

    @property
    def model_dir(self) -> Path:
        return self.root / self.model

    async def sync(self, wanted: Wanted | None = None) -> SyncReport:
        """Make the copy hold exactly the wanted versions, verified; `wanted` defaults to what
        the source says now. Raises ModelCopyFailed (ChecksumMismatch) and leaves the versions
        already in place as they were."""
        wanted = wanted if wanted is not None else await self.source.wanted(self.model)
        report = SyncReport()
        async with self._locked(fcntl.LOCK_EX):
            await asyncio.to_thread(self._clean_staging)
            for version, files in sorted(wanted.versions.items()):
                await self._sync_version(version, files, report)
            report.removed = await asyncio.to_thread(self._remove_except, set(wanted.versions))
        if report.fetched:
            log.info(
                "model %s: copied %d file(s), %d bytes, from the repository node into %s (SHA-256 verified)",
                self.model, len(report.fetched), report.bytes_copied, self.model_dir,
            )
        return report

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Hold the copy still (a shared lock) while it is read: loading, the repository watch."""
        async with self._locked(fcntl.LOCK_SH):
            yield

    # -- one version ------------------------------------------------------------------------------
    async def _sync_version(self, version: int, files: dict[str, FileDigest], report: SyncReport) -> None:
        for relative in files:
            check_relative(relative)
        target = self.model_dir / str(version)
        check = await asyncio.to_thread(self._check, target, version, files)
        if target.is_dir() and not check.missing and not check.mismatched and not check.extra:
            return
        for relative in check.mismatched:
            log.warning(
                "model %s version %d: the copy of %s on this node does not match the repository's SHA-256 "
                "(damaged here, or changed there); fetching it again", self.model, version, relative,
            )
        stale = check.missing + check.mismatched
        await asyncio.to_thread(self._check_disk, sum(files[relative].size_bytes for relative in stale))
        staging = self.root / STAGING_DIR / _SEPARATOR.join((self.model, str(version), uuid.uuid4().hex))
        try:
            await asyncio.to_thread(_link_all, target, staging, check.good)
            for relative in stale:
                report.bytes_copied += await self._fetch(version, relative, files[relative], staging / relative)
                report.fetched.append(f"{version}/{relative}")
            await asyncio.to_thread(self._install, staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        report.mismatched.extend(f"{version}/{relative}" for relative in check.mismatched)
        await asyncio.to_thread(self._remember, target, version, files)

    def _check(self, target: Path, version: int, files: dict[str, FileDigest]) -> _Check:
        """Which local files match their digests (hashing those this process has not)."""
        result = _Check(good=[], missing=[], mismatched=[], extra=False)
        for relative, digest in sorted(files.items()):
            path = target / relative
            if path.is_symlink() or not path.is_file():
                result.missing.append(relative)
                continue
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if self._verified.get((version, relative)) == (*key, digest.sha256):
                result.good.append(relative)
            elif stat.st_size == digest.size_bytes and sha256_file(path) == digest.sha256:
                self._verified[(version, relative)] = (*key, digest.sha256)
                result.good.append(relative)
            else:
                self._verified.pop((version, relative), None)
                result.mismatched.append(relative)
        result.extra = target.is_dir() and bool(set(version_files(target)) - set(files))
        return result

    def _remember(self, target: Path, version: int, files: dict[str, FileDigest]) -> None:
        for relative, digest in files.items():
            stat = (target / relative).stat()
            self._verified[(version, relative)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino, digest.sha256)

    async def _fetch(self, version: int, relative: str, digest: FileDigest, destination: Path) -> int:
        """Copy one file in chunks, hashing what is written; ChecksumMismatch unless it is the
        repository's file exactly. Returns its size."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        offsets = iter(range(0, digest.size_bytes, CHUNK_BYTES))
        pending: deque[asyncio.Task[bytes]] = deque()

        def ask() -> None:
            offset = next(offsets, None)
            if offset is not None:
                size = min(CHUNK_BYTES, digest.size_bytes - offset)
                pending.append(asyncio.ensure_future(self.source.chunk(self.model, version, relative, offset, size)))

        hasher = hashlib.sha256()
        received = 0
        try:
            with open(destination, "wb") as out:
                for _ in range(FETCH_WINDOW):
                    ask()
                while pending:
                    data = await pending.popleft()
                    ask()
                    await asyncio.to_thread(_write, out, hasher, data)
                    received += len(data)
                out.flush()
                os.fsync(out.fileno())
        finally:
            for task in pending:
                task.cancel()
        got = hasher.hexdigest()
        if received != digest.size_bytes or got != digest.sha256:
            raise ChecksumMismatch(
                f"model {self.model} version {version}: {relative} does not match the repository's SHA-256 after its "
                f"copy to this node (expected {digest.sha256} for {digest.size_bytes} bytes, got {got} for {received}); "
                "the copy was discarded"
            )
        return received

    def _install(self, staging: Path, target: Path) -> None:
        """Rename the complete, verified version into place (replacing an older copy of it)."""
        fsync_tree(staging)
        self.model_dir.mkdir(parents=True, exist_ok=True, mode=COPY_DIR_MODE)
        old: Path | None = None
        if target.exists():
            old = self.root / STAGING_DIR / _SEPARATOR.join((self.model, target.name, "old", uuid.uuid4().hex))
            os.rename(target, old)
        os.rename(staging, target)
        fsync_dir(self.model_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- the folder ---------------------------------------------------------------------------------
    def _check_disk(self, needed_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=COPY_DIR_MODE)
        free = shutil.disk_usage(self.root).free
        if needed_bytes + DISK_MARGIN_BYTES > free:
            raise ModelCopyFailed(
                f"model {self.model}: copying it to this node needs {needed_bytes} bytes in {self.root}, "
                f"but only {free} are free (scale.copy_dir, docs/SCALE.md)"
            )

    def _clean_staging(self) -> None:
        """Leftovers of this model's copies that died half-way (safe: this process holds the
        model's lock, so no copy of it is under way)."""
        area = self.root / STAGING_DIR
        if area.is_dir():
            for entry in area.iterdir():
                if entry.name.startswith(self.model + _SEPARATOR):
                    shutil.rmtree(entry, ignore_errors=True)

    def _remove_except(self, keep: set[int]) -> list[int]:
        removed: list[int] = []
        if not self.model_dir.is_dir():
            return removed
        for entry in self.model_dir.iterdir():
            version = parse_version(entry.name)
            if version is None or version in keep or not entry.is_dir():
                continue
            trash = self.root / STAGING_DIR / _SEPARATOR.join((self.model, entry.name, "old", uuid.uuid4().hex))
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
            self._verified = {key: value for key, value in self._verified.items() if key[0] != version}
            removed.append(version)
        if removed:
            log.info("model %s: removed version(s) %s from this node's copy (no longer served)", self.model, sorted(removed))
        return sorted(removed)

    @contextlib.asynccontextmanager
    async def _locked(self, mode: int) -> AsyncIterator[None]:
        """The model's lock on this node (flock: released when the process dies). Polled with
        LOCK_NB, so waiting never blocks the event loop and a cancelled wait leaves nothing behind."""
        self.model_dir.mkdir(parents=True, exist_ok=True, mode=COPY_DIR_MODE)
        (self.root / STAGING_DIR).mkdir(exist_ok=True, mode=COPY_DIR_MODE)
        descriptor = os.open(self.model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(descriptor)


class MirroredWatch(RepositoryWatch):
    """The repository watch of a replica that serves from a copy: each poll first brings the
    copy up to date (a newly published or re-defaulted version is copied then), then lets the
    ModelService act on the copy as it would on the repository."""

    def __init__(self, service: ModelService, interval_s: float, mirror: NodeMirror) -> None:
        super().__init__(service, interval_s)
        self.mirror = mirror

    async def poll_once(self) -> list[str]:
        await self.mirror.sync()
        async with self.mirror.reading():
            return await super().poll_once()


def _link_all(source_dir: Path, staging: Path, relatives: list[str]) -> None:
    """Hard-link the files that already match into the version being assembled (no copy)."""
    staging.mkdir(parents=True, mode=COPY_DIR_MODE)
    for relative in relatives:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(source_dir / relative, staging / relative)


def _write(out: BinaryIO, hasher: Any, data: bytes) -> None:
    out.write(data)
    hasher.update(data)
