"""Header index numbers: a value holding a non-ASCII character is not a number.

Revision ID: 0002
Revises: 0001

Until 2026-11-30 the index read any Unicode digit as a digit (Python's ``\\d`` and ``float()``), so
a value such as '٣' (U+0663) was indexed as the number 3 where XPath's ``number()`` gives NaN,
and an index-only query could match a header its XPath does not.  XPath's number grammar is
ASCII only, so no row whose text holds a non-ASCII character has a number.  One pass over the
index (about a minute per million headers on SQLite), once.
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        non_ascii = "octet_length(text) <> char_length(text)"
    else:
        non_ascii = "length(CAST(text AS BLOB)) <> length(text)"       # bytes against characters
    op.execute(f"UPDATE hvalues SET num = NULL WHERE num IS NOT NULL AND {non_ascii}")


def downgrade() -> None:
    """Nothing to undo: the numbers it removed were wrong."""
