"""Persistent state in SQL (SQLAlchemy 2 + Alembic): API keys, admin users, sessions, settings,
audit events, request log. Never imports the runtime or the APIs."""
