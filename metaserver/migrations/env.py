"""Alembic's environment for the metadata database: migrations run on the connection the
metaserver hands over (``metaserver.migrate``), never from an alembic.ini."""

from __future__ import annotations

from alembic import context

from metaserver import index, schema

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=[schema.metadata, index.metadata],
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
