"""Which models an admin deployed or held back, so the decision survives a restart.

A model with no row is deployed (the default: every deployable model in the repository is
served). Each change is written with its audit event in one transaction. Never imports the
runtime or the APIs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from appliance.store.admin_models import Deployment
from appliance.store.audit import AuditLog
from appliance.store.db import Database


class DeploymentStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def held_back(self) -> set[str]:
        """Models an admin undeployed: the server must not load them at start."""
        with self.database.session() as session:
            return set(session.scalars(select(Deployment.model).where(Deployment.deployed.is_(False))))

    def set(self, model: str, deployed: bool, *, actor: str, address: str, detail: str = "") -> None:
        now = datetime.now(UTC)
        with self.database.session() as session:
            row = session.get(Deployment, model)
            if row is None:
                session.add(Deployment(model=model, deployed=deployed, updated_at=now, updated_by=actor))
            else:
                row.deployed, row.updated_at, row.updated_by = deployed, now, actor
            action = "model.deploy" if deployed else "model.undeploy"
            AuditLog.record_in(session, action, actor=actor, address=address, target=model, detail=detail)

    def forget(self, model: str) -> None:
        """Drop the decision about a deleted model."""
        with self.database.session() as session:
            row = session.get(Deployment, model)
            if row is not None:
                session.delete(row)
