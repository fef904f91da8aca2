"""Alembic's entry point, run in code by ``jobs.database.migrate`` with an open connection."""

from __future__ import annotations

from alembic import context

from diffuser_api.jobs.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
