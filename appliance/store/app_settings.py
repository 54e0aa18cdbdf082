"""Settings an admin changed from the web UI, kept in the database as JSON values.

They override the configuration file and environment for the keys listed in `UI_SETTING_KEYS`
(the configuration still gives the defaults). Each change is written with its audit event in
one transaction. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from appliance.store.admin_models import AppSetting
from appliance.store.audit import AuditLog
from appliance.store.db import Database

#: The settings the UI may change; anything else stays in the configuration file.
UI_SETTING_KEYS = frozenset(
    {"logging_mode", "log_retention_days", "api_networks", "admin_networks", "cost", "scale_models"}
)


class AppSettingsStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def all(self) -> dict[str, Any]:
        with self.database.session() as session:
            return {row.key: json.loads(row.value_json) for row in session.scalars(select(AppSetting))}

    def set_many(
        self, values: dict[str, Any], *, actor: str, address: str, action: str, detail: str, target: str | None = None
    ) -> None:
        """Write several settings and one audit event atomically (its target: `target`, else the keys)."""
        unknown = set(values) - UI_SETTING_KEYS
        if unknown:
            raise ValueError(f"not a UI setting: {sorted(unknown)}")
        now = datetime.now(UTC)
        with self.database.session() as session:
            for key, value in values.items():
                row = session.get(AppSetting, key)
                encoded = json.dumps(value, sort_keys=True)
                if row is None:
                    session.add(AppSetting(key=key, value_json=encoded, updated_at=now, updated_by=actor))
                else:
                    row.value_json, row.updated_at, row.updated_by = encoded, now, actor
            AuditLog.record_in(
                session, action, actor=actor, address=address, target=target or ",".join(sorted(values)), detail=detail
            )

    def clear(self, *, actor: str, address: str) -> list[str]:
        """Forget every UI override (the configuration applies again); returns the keys."""
        with self.database.session() as session:
            keys = sorted(session.scalars(select(AppSetting.key)))
            session.execute(delete(AppSetting))
            AuditLog.record_in(
                session, "settings.reset", actor=actor, address=address, target=",".join(keys),
                detail="UI overrides removed; the configuration applies",
            )
            return keys
