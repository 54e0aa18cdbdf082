"""A throwaway PostgreSQL server (Debian's binaries) for the tests that run the store on
PostgreSQL: one cluster per test module, on a Unix socket only, trusted local user
`appliance`. The fixture skips where the server binaries are not installed. Only tests import
this module."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import free_port

SERVER_USER = "postgres"
PG_START_TIMEOUT_S = 60


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as its own user")
    prefix = ["runuser", "-u", SERVER_USER, "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    data = root / "data"
    if as_root:
        os.chmod(root, 0o755)
        shutil.chown(root, SERVER_USER)
    port = free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "appliance", "--no-sync"], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", str(PG_START_TIMEOUT_S), "start"],
                   check=True, capture_output=True, timeout=PG_START_TIMEOUT_S + 30)
    try:
        yield f"postgresql+psycopg://appliance@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
