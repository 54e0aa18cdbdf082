"""API keys in the appliance database: creation, verification, scopes, revocation, expiry."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from appliance.errors import InvalidInput, NotFound, Unauthorized
from appliance.store.db import Database
from appliance.store.keys import KEY_PATTERN, KeyStore, hash_key
from appliance.store.migrate import current_revision, head_revision, upgrade
from appliance.store.models import ApiKey


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'appliance.db'}")
    upgrade(db)
    yield db
    db.close()


def test_migrations_reach_head_idempotently_and_sqlite_runs_in_wal(database: Database, tmp_path: Path) -> None:
    assert current_revision(database) == head_revision() is not None
    assert upgrade(database) == head_revision()
    mode = sqlite3.connect(tmp_path / "appliance.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_key_has_public_prefix_256_secret_bits_and_only_its_sha256_is_stored(database: Database, tmp_path: Path) -> None:
    key, info = KeyStore(database).create("ci", ["infer"])
    match = KEY_PATTERN.fullmatch(key)
    assert match is not None and match.group(1) == info.prefix
    assert len(match.group(2)) >= 43  # token_urlsafe(32): 256 random bits
    raw = (tmp_path / "appliance.db").read_bytes() + (tmp_path / "appliance.db-wal").read_bytes()
    assert key.encode() not in raw and match.group(2).encode() not in raw
    assert hash_key(key).encode() in raw


def test_valid_key_verifies_with_its_scopes_and_records_last_use(database: Database) -> None:
    store = KeyStore(database)
    key, _ = store.create("ops", ["infer", "metrics"])
    info = store.verify(key)
    assert info.scopes == ("infer", "metrics")
    assert store.list()[0].last_used_at is not None


def test_unknown_tampered_revoked_and_expired_keys_are_refused(database: Database) -> None:
    store = KeyStore(database)
    key, info = store.create("a")
    with pytest.raises(Unauthorized):
        store.verify(key[:-2] + ("AA" if not key.endswith("AA") else "BB"))
    with pytest.raises(Unauthorized):
        store.verify("not-a-key")
    with pytest.raises(Unauthorized):
        store.verify(f"apl_{'0' * 12}_{'x' * 43}")
    expiring, _ = store.create("b", expires_days=1)
    with database.session() as session:
        session.execute(update(ApiKey).where(ApiKey.name == "b").values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    with pytest.raises(Unauthorized, match="expired"):
        store.verify(expiring)
    store.revoke(info.name)
    with pytest.raises(Unauthorized, match="revoked"):
        store.verify(key)
    assert {i.name: i.state() for i in store.list()} == {"a": "revoked", "b": "expired"}


def test_bad_scope_name_expiry_and_duplicates_are_refused_naming_the_field(database: Database) -> None:
    store = KeyStore(database)
    with pytest.raises(InvalidInput) as bad_scope:
        store.create("x", ["root"])
    assert bad_scope.value.field == "scope"
    with pytest.raises(InvalidInput) as bad_name:
        store.create("no spaces allowed")
    assert bad_name.value.field == "name"
    with pytest.raises(InvalidInput) as bad_expiry:
        store.create("y", expires_days=0)
    assert bad_expiry.value.field == "expires"
    store.create("dup")
    with pytest.raises(InvalidInput, match="already exists"):
        store.create("dup")
    with pytest.raises(NotFound):
        store.revoke("nobody")
