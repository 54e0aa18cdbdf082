"""Alembic migration scripts of the appliance database (shipped as package data)."""
