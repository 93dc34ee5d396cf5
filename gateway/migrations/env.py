"""Alembic's entry point: migrations run on the connection `gateway.store.db` hands over, never from a URL."""

from __future__ import annotations

from alembic import context

from gateway.store.db import metadata

connection = context.config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError(
        "gateway migrations run through `gateway db upgrade` (Database.upgrade), on a live connection"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters a table by copying it; batch mode is how autogenerate writes that.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
