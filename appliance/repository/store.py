"""Reading and atomically publishing model versions on disk.

Layout (Triton's): `<models_dir>/<name>/<version>/` holding the ONNX file(s), tokenizer files,
manifest.json and report.json. A version directory appears only complete: it is assembled in
`<models_dir>/.staging/`, every file fsynced, then renamed into place, so a crash at any moment
leaves no partial version visible. Version numbers only grow, also across deletions (the
highest number ever used is kept in `<name>/.last_version`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from appliance.errors import ModelNotFound, ModelRejected
from appliance.repository.checksums import digest_cache_path
from appliance.repository.manifest import (
    MANIFEST_FILE,
    REPORT_FILE,
    Manifest,
    Report,
    check_model_name,
    parse_version,
)

STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
LAST_VERSION_FILE = ".last_version"


@dataclass(frozen=True)
class ModelVersion:
    """One published version: where it lives and what it declares."""

    path: Path
    manifest: Manifest
    report: Report | None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def variant(self) -> str:
        """The export's variant name (int4 and int4-exact share the manifest's "int4")."""
        return self.report.variant if self.report is not None else self.manifest.quantization

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def read_version(path: Path) -> ModelVersion:
    """Load and validate one version folder; ModelRejected says what is wrong with it."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except FileNotFoundError:
        raise ModelRejected(f"{path.name}: {MANIFEST_FILE} is missing") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        raise ModelRejected(f"{manifest_path}: {loc}: {first.get('msg')}", field=loc) from None
    report: Report | None = None
    report_path = path / REPORT_FILE
    if report_path.exists():
        try:
            report = Report.model_validate_json(report_path.read_bytes())
        except ValidationError:
            report = None
    return ModelVersion(path=path, manifest=manifest, report=report)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` on disk (before a rename makes them visible)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRepository:
    """The `models/` folder of the state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and self._version_dirs(p)
        )

    def _version_dirs(self, model_dir: Path) -> list[Path]:
        return sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and parse_version(p.name) is not None),
            key=lambda p: int(p.name),
        )

    def versions(self, name: str) -> list[ModelVersion]:
        """Every readable version of `name`, oldest first; unreadable ones are skipped."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} not found", field="model")
        found: list[ModelVersion] = []
        for path in self._version_dirs(model_dir):
            try:
                found.append(read_version(path))
            except ModelRejected:
                continue
        return found

    def broken_versions(self, name: str) -> dict[int, str]:
        """Version folders of `name` that fail to read, with the reason (for doctor and UI)."""
        broken: dict[int, str] = {}
        model_dir = self.root / name
        if model_dir.is_dir():
            for path in self._version_dirs(model_dir):
                try:
                    read_version(path)
                except ModelRejected as exc:
                    broken[int(path.name)] = exc.message
        return broken

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """One version; without `version`, the one to serve (see `serving_version`)."""
        if version is None:
            chosen = self.serving_version(name)
            if chosen is None:
                raise ModelNotFound(f"model {name!r} has no deployable version", field="model")
            return chosen
        path = self.root / name / str(version)
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} version {version} not found", field="version")
        return read_version(path)

    def serving_version(self, name: str) -> ModelVersion | None:
        """The version marked default, else the newest deployable one."""
        deployable = [v for v in self.versions(name) if v.manifest.deployable]
        if not deployable:
            return None
        defaults = [v for v in deployable if v.manifest.default]
        return (defaults or deployable)[-1]

    def all_versions(self) -> list[ModelVersion]:
        return [v for name in self.names() for v in self.versions(name)]

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging_dir(self) -> Path:
        """A fresh private folder to assemble a version in (same filesystem as the repo)."""
        path = self.root / STAGING_DIR / uuid.uuid4().hex
        path.mkdir(parents=True, mode=0o700)
        return path

    def clean_staging(self) -> None:
        """Remove leftovers of interrupted exports (safe: nothing in staging is visible)."""
        shutil.rmtree(self.root / STAGING_DIR, ignore_errors=True)

    def next_version(self, name: str) -> int:
        model_dir = self.root / name
        highest = 0
        if model_dir.is_dir():
            dirs = self._version_dirs(model_dir)
            if dirs:
                highest = int(dirs[-1].name)
            marker = model_dir / LAST_VERSION_FILE
            if marker.exists():
                try:
                    highest = max(highest, int(marker.read_text().strip() or 0))
                except ValueError:
                    pass
        return highest + 1

    def publish(self, staged: Path, manifest: Manifest, report: Report | None) -> ModelVersion:
        """Write manifest/report into `staged`, fsync everything and rename it into place.

        The version number in `manifest` is replaced by the next free one under the lock, so
        concurrent exports of one name never collide.
        """
        check_model_name(manifest.name)
        with self._locked():
            model_dir = self.root / manifest.name
            model_dir.mkdir(exist_ok=True)
            version = self.next_version(manifest.name)
            manifest = manifest.model_copy(update={"version": version})
            if manifest.default:
                self._clear_default(manifest.name)
            (staged / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            if report is not None:
                (staged / REPORT_FILE).write_text(report.model_dump_json(indent=2))
            fsync_tree(staged)
            target = model_dir / str(version)
            os.rename(staged, target)
            _write_atomic(model_dir / LAST_VERSION_FILE, str(version))
            fsync_dir(model_dir)
        return read_version(target)

    def _clear_default(self, name: str) -> None:
        for existing in self.versions(name):
            if existing.manifest.default:
                self._rewrite_manifest(existing, default=False)

    def _rewrite_manifest(self, version: ModelVersion, **changes: object) -> ModelVersion:
        updated = version.manifest.model_copy(update=changes)
        _write_atomic(version.path / MANIFEST_FILE, updated.model_dump_json(indent=2))
        return ModelVersion(path=version.path, manifest=updated, report=version.report)

    def set_default(self, name: str, version: int) -> ModelVersion:
        with self._locked():
            chosen = self.get(name, version)
            self._clear_default(name)
            return self._rewrite_manifest(self.get(name, version), default=True) if chosen else chosen

    def set_deployable(self, name: str, version: int, deployable: bool) -> ModelVersion:
        """Force a rejected version deployable (the explicit override) or withdraw one."""
        with self._locked():
            return self._rewrite_manifest(self.get(name, version), deployable=deployable)

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version or the whole model; returns the version numbers removed.

        The folder is first renamed out of sight, so a reader never sees half a version.
        """
        with self._locked():
            model_dir = self.root / name
            if not model_dir.is_dir():
                raise ModelNotFound(f"model {name!r} not found", field="model")
            targets = (
                [model_dir / str(version)] if version is not None else self._version_dirs(model_dir)
            )
            removed: list[int] = []
            for path in targets:
                if not path.is_dir():
                    raise ModelNotFound(f"model {name!r} version {version} not found", field="version")
                trash = self.root / STAGING_DIR / f"deleted-{uuid.uuid4().hex}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                digest_cache_path(path).unlink(missing_ok=True)
                removed.append(int(path.name))
            # The model folder itself stays (holding only .last_version) so that a model
            # exported again under the same name continues its version numbers.
            return removed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def dump_json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
