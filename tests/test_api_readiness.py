"""Kubernetes probe semantics: liveness only says the process answers; readiness says 503
while draining or when the database cannot be reached, and recovers when it can."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from appliance.repository.store import ModelRepository
from appliance.store.db import Database
from tests.helpers.server import running_server
from tests.helpers.tiny_models import publish_adder


def test_unreachable_database_makes_readiness_503_but_not_liveness(state_dir: Path, tmp_path: Path) -> None:
    publish_adder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server:
        ctx = server.ctx
        original = ctx.database
        broken_dir = tmp_path / "db-dir"
        ctx.database = Database(f"sqlite:///{broken_dir / 'x.db'}")
        shutil.rmtree(broken_dir)
        broken_dir.write_text("a file where the database folder was")  # SQLite cannot open it now
        ctx._db_checked = 0.0
        ready = httpx.get(server.url("/v2/health/ready"))
        assert ready.status_code == 503 and ready.json() == {"ready": False, "reason": "database unreachable"}
        assert httpx.get(server.url("/v2/health/live")).status_code == 200
        ctx.database = original
        ctx._db_checked = 0.0
        assert httpx.get(server.url("/v2/health/ready")).status_code == 200


def test_draining_server_is_not_ready_and_refuses_new_work_with_503(state_dir: Path) -> None:
    publish_adder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server:
        server.ctx.draining = True
        assert httpx.get(server.url("/v2/health/ready")).json() == {"ready": False, "reason": "draining"}
        refused = httpx.get(server.url("/v2/models/adder"), headers=server.auth())
        assert refused.status_code == 503 and refused.json() == {"error": "the server is shutting down"}
        assert httpx.get(server.url("/v2/health/live")).status_code == 200
        server.ctx.draining = False
