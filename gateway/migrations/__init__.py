"""Alembic migrations of the record; `Database.upgrade()` runs them (no alembic.ini is needed)."""
