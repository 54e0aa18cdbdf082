"""The suite's heavy session exports (the real default models), made once per test run even
when pytest-xdist spreads the suite over worker processes, and handed to each worker as
hard-linked copies.

Why copies: tests start servers on a fixture's state directory, and a server writes its
database and may publish or flag versions there; two workers doing so in one folder would
see each other's keys and versions. A hard link costs nothing, and the repository never
writes into a published file in place (a changed manifest is a new file), so the shared
export stays as it was built.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

#: Written last into a shared folder: the build finished (a worker that died mid-build leaves
#: a folder without it, which the next worker builds again).
BUILT_MARKER = ".built"


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` filled, built by the first process of this test run that asks for it.

    Without xdist that is a fresh temporary folder; under xdist every worker's temporary root
    sits in one folder per run, where the first worker builds under a file lock while the
    others wait for it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{shared}.lock"):
        if not (shared / BUILT_MARKER).exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            build(shared)
            (shared / BUILT_MARKER).touch()
    return shared


def _link_or_copy(source: str, target: str) -> None:
    """A hard link when both sides share a filesystem, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_models(models_dir: Path, target: Path, names: tuple[str, ...] | None = None) -> None:
    """Hard-link every published version of `names` (all models when None) from `models_dir`
    into `target` (never the staging area or the lock)."""
    chosen = names if names is not None else tuple(path.name for path in models_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    for name in chosen:
        source = models_dir / name
        if not source.is_dir():
            continue
        shutil.copytree(
            source, target / name, copy_function=_link_or_copy, dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".staging", ".lock"),
        )
