"""Private scratch space for one export, inside the repository's staging area.

Each export leases `<models>/.staging/<id>.lock` (an flock held for the life of the export)
and works in `<id>-work/` and `<id>-version/` beside it, on the same filesystem as the
repository so the finished version is renamed, not copied, into place. A crashed export
(kill -9) releases its flock with the process, so the next export removes its leftovers;
a running export's lease is never touched. Nothing here is ever visible as a model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from appliance.repository import ModelRepository
from appliance.repository.store import STAGING_DIR

LOCK_SUFFIX = ".lock"


def clean_stale_staging(repository: ModelRepository) -> list[str]:
    """Remove every staging entry whose owner is gone; returns the names removed."""
    area = repository.root / STAGING_DIR
    if not area.is_dir():
        return []
    live: set[str] = set()
    for lock in area.glob(f"*{LOCK_SUFFIX}"):
        lease_id = lock.name[: -len(LOCK_SUFFIX)]
        try:
            handle = open(lock, "a+")
        except FileNotFoundError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.add(lease_id)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
    removed: list[str] = []
    for entry in area.iterdir():
        lease_id = entry.name.split("-", 1)[0].removesuffix(LOCK_SUFFIX)
        if lease_id in live:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


class StagingLease:
    """Context manager: a locked work folder and version folder, removed on exit."""

    def __init__(self, repository: ModelRepository) -> None:
        self.area = repository.root / STAGING_DIR
        self.lease_id = uuid.uuid4().hex
        self.lock_path = self.area / f"{self.lease_id}{LOCK_SUFFIX}"
        self.work_dir = self.area / f"{self.lease_id}-work"
        self.version_dir = self.area / f"{self.lease_id}-version"
        self._handle: object | None = None

    def __enter__(self) -> StagingLease:
        self.area.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                handle = open(self.lock_path, "a+")
                self._handle = handle
                fcntl.flock(handle, fcntl.LOCK_EX)
                # A concurrent clean may have unlinked the file between open and flock; holding
                # a lock on an unlinked file protects nothing, so take a fresh one.
                try:
                    if os.stat(self.lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                        break
                except FileNotFoundError:
                    pass
                handle.close()
            self.work_dir.mkdir(mode=0o700)
            self.version_dir.mkdir(mode=0o700)
        except BaseException:
            # `with` calls __exit__ only once __enter__ has returned: a Ctrl-C (or a full disk)
            # while the lease is being set up must remove what was already made.
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for path in (self.work_dir, self.version_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        if self._handle is not None:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
