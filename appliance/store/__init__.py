"""Persistent state in SQL (SQLAlchemy 2 + Alembic): API keys, admin users, sessions, settings,
audit events, request log. Never imports the runtime or the APIs."""

from appliance.store.db import Database
from appliance.store.keys import SCOPES, KeyInfo, KeyStore, Scope
from appliance.store.migrate import current_revision, head_revision, upgrade

__all__ = ["SCOPES", "Database", "KeyInfo", "KeyStore", "Scope", "current_revision", "head_revision", "upgrade"]
