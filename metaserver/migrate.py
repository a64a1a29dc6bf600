"""The metadata database's schema, versioned with Alembic (``metaserver/migrations``).

A metaserver brings its database to the newest revision it knows as it starts, under a lock
(PostgreSQL advisory lock; SQLite has one writer), so several metaserver processes over one
database may start at once.  A database written before revisions existed is brought up to the
baseline (missing tables and columns added) and stamped.  A database at a revision this code does
not know was written by a newer dgf: the metaserver refuses it rather than guess.

A schema change is a new revision: ``metaserver/migrations/versions/NNNN_what.py`` with
``down_revision`` the previous one, using ``alembic.op`` (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from dgf import errors

#: PostgreSQL advisory lock key of schema changes ("dgf-schema" as a number).
LOCK_KEY = 0x6467662D736368


def _config(conn: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "metaserver:migrations")
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_config(None)).get_current_head())


def current(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
    return None if rev is None else str(rev)


def upgrade(engine: sa.Engine, legacy: Callable[[sa.Connection], None]) -> str:
    """Bring the database to the newest revision; ``legacy`` brings a database made before
    revisions existed up to the baseline.  Returns the revision."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        cfg = _config(conn)
        at = MigrationContext.configure(conn).get_current_revision()
        script = ScriptDirectory.from_config(cfg)
        if at is not None:
            try:
                known = script.get_revision(at) is not None
            except CommandError:
                known = False
            if not known:
                raise errors.ServerError(
                    f"the metadata database is at schema revision {at!r}, which this dgf does not know "
                    f"(it knows up to {script.get_current_head()!r}): it was written by a newer dgf; "
                    "upgrade dgf rather than run an older one on it.")
        elif "inodes" in sa.inspect(conn).get_table_names():
            legacy(conn)                            # made before revisions: up to the baseline
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")
        return str(MigrationContext.configure(conn).get_current_revision())
