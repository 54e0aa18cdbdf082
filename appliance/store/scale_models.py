"""Per-model scale-out settings an admin changed on the Models page (Ray mode, docs/SCALE.md):
a model's replicas (a fixed count or autoscaling bounds) and what each replica reserves.

Why here: they must outlive the server (`appliance serve --ray` deploys with them the next
time) and reach every ingress replica, so they live in the database with the other settings
an admin changes from the UI (`app_settings`, key `scale_models`: {model: {field: value}}),
which also makes `appliance admin reset-settings` forget them with the rest. Each change is
written with its audit event in one transaction. Values are validated by the caller against
config.ScaleModelSettings, as the TOML file's are; only `config.ADMIN_SCALE_FIELDS` are kept.
Never imports Ray.
"""

from __future__ import annotations

from typing import Any

from appliance.config import ADMIN_SCALE_FIELDS, ScaleModelSettings
from appliance.store.app_settings import AppSettingsStore
from appliance.store.db import Database
from appliance.store.migrate import upgrade

SCALE_MODELS_KEY = "scale_models"


class ScaleModelChanges:
    def __init__(self, database: Database) -> None:
        self._settings = AppSettingsStore(database)

    def all(self) -> dict[str, dict[str, Any]]:
        """{model: {field: value}} as saved (a malformed entry is left out)."""
        saved = self._settings.all().get(SCALE_MODELS_KEY)
        if not isinstance(saved, dict):
            return {}
        return {name: dict(fields) for name, fields in saved.items() if isinstance(fields, dict)}

    def set(self, model: str, settings: ScaleModelSettings, *, actor: str, address: str) -> dict[str, dict[str, Any]]:
        """Save `model`'s admin-editable settings (audited); returns every model's changes."""
        changes = self.all()
        changes[model] = {field: getattr(settings, field) for field in ADMIN_SCALE_FIELDS}
        self._settings.set_many(
            {SCALE_MODELS_KEY: changes}, actor=actor, address=address, action="scale.model", target=model,
            detail=describe(settings),
        )
        return changes


def saved_changes(database_url: str) -> dict[str, dict[str, Any]]:
    """The saved changes, for a process that deploys before the server opened the database
    (`appliance serve --ray`): migrates it first, as every process that opens it does."""
    database = Database(database_url)
    try:
        upgrade(database)
        return ScaleModelChanges(database).all()
    finally:
        database.close()


def describe(settings: ScaleModelSettings) -> str:
    """One line for the audit log: the replicas and what each reserves."""
    if settings.autoscaling:
        replicas = (
            f"autoscaling {settings.min_replicas or 1}-{settings.max_replicas} replicas, "
            f"target {settings.target_ongoing_requests:g} requests in flight each"
        )
    else:
        replicas = f"{settings.replicas} replica{'s' if settings.replicas != 1 else ''}"
    memory = f", memory {settings.memory_bytes} bytes" if settings.memory_bytes else ""
    return f"{replicas}; each {settings.num_cpus:g} CPU, {settings.num_gpus:g} GPU{memory}"
