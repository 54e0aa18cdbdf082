"""An admin's decisions about each model, so they survive a restart: deployed or held back,
pinned (never evicted), and its own keep-alive.

A model with no row is deployed, not pinned, and idles out after the server's default
keep-alive. Each change is written with its audit event in one transaction. The server reads
the decisions when it starts, after each admin action, and at every repository poll (so a
`appliance models pin` from a shell takes effect within `repository_poll_s`). Never imports
the runtime or the APIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.store.admin_models import Deployment
from appliance.store.audit import AuditLog
from appliance.store.db import Database


@dataclass(frozen=True)
class ModelPolicy:
    """What an admin decided about one model (defaults where nothing was decided)."""

    deployed: bool = True
    #: None: no decision (the config file's `pin` applies).
    pinned: bool | None = None
    #: Idle seconds before unloading (-1: never); None: the server's default.
    keep_alive_s: float | None = None


class DeploymentStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def held_back(self) -> set[str]:
        """Models an admin undeployed: the server must not load them."""
        with self.database.session() as session:
            return set(session.scalars(select(Deployment.model).where(Deployment.deployed.is_(False))))

    def policies(self) -> dict[str, ModelPolicy]:
        """Every model an admin decided something about."""
        with self.database.session() as session:
            return {
                row.model: ModelPolicy(deployed=row.deployed, pinned=row.pinned, keep_alive_s=row.keep_alive_s)
                for row in session.scalars(select(Deployment))
            }

    def set(self, model: str, deployed: bool, *, actor: str, address: str, detail: str = "") -> None:
        with self.database.session() as session:
            row = self._row(session, model, actor)
            row.deployed = deployed
            action = "model.deploy" if deployed else "model.undeploy"
            AuditLog.record_in(session, action, actor=actor, address=address, target=model, detail=detail)

    def set_pinned(self, model: str, pinned: bool, *, actor: str, address: str) -> None:
        with self.database.session() as session:
            self._row(session, model, actor).pinned = pinned
            AuditLog.record_in(session, "model.pin" if pinned else "model.unpin", actor=actor, address=address, target=model)

    def set_keep_alive(self, model: str, keep_alive_s: float | None, *, actor: str, address: str) -> None:
        """`keep_alive_s` None: back to the server's default."""
        with self.database.session() as session:
            self._row(session, model, actor).keep_alive_s = keep_alive_s
            detail = "server default" if keep_alive_s is None else f"{keep_alive_s:g} s"
            AuditLog.record_in(session, "model.keep_alive", actor=actor, address=address, target=model, detail=detail)

    @staticmethod
    def _row(session: Session, model: str, actor: str) -> Deployment:
        now = datetime.now(UTC)
        row = session.get(Deployment, model)
        if row is None:
            row = Deployment(model=model, deployed=True, pinned=None, keep_alive_s=None, updated_at=now, updated_by=actor)
            session.add(row)
        row.updated_at, row.updated_by = now, actor
        return row

    def forget(self, model: str) -> None:
        """Drop the decisions about a deleted model."""
        with self.database.session() as session:
            row = session.get(Deployment, model)
            if row is not None:
                session.delete(row)
