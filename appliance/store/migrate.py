"""Schema migrations with Alembic, configured in code so installed copies need no alembic.ini.

The migration scripts ship inside the package (`appliance/store/migrations/`). The server runs
`upgrade()` at start, `appliance db upgrade` runs it on demand, and `appliance doctor` compares
`current_revision()` with `head_revision()`. Never drops data without a migration saying so.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from appliance.errors import ConfigError
from appliance.store.db import Database

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = database.engine
    return config


def upgrade(database: Database, revision: str = "head") -> str | None:
    """Migrate the database to `revision`; returns the revision it is at afterwards."""
    try:
        command.upgrade(alembic_config(database), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(f"database_url: migration failed: {exc.__class__.__name__}: {exc}", field="database_url") from None
    return current_revision(database)


def current_revision(database: Database) -> str | None:
    with database.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()
