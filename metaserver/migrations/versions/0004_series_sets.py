"""Series sets: the index rows a series' headers have in common, stored once.

Revision ID: 0004
Revises: 0003

Until 2026-12-02 every header's ~56-100 index rows went into ``hvalues``, three B-trees each,
and that insert was most of the loader's time and a third of the metaserver's CPU per uploaded
file.  The headers of one series committed together now keep the rows they all have in one set
(``hshared``, members in ``hmembers``); the planner reads both through the view ``hindex``
(and ``hsample`` for its estimates).
Rows indexed before stay where they are (a header with no set reads as before): nothing to copy.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before revisions existed was first given every table the code declares
    # (these included), then stamped with the baseline: create only what is missing.
    have = set(sa.inspect(op.get_bind()).get_table_names())
    text = sa.Text().with_variant(sa.dialects.postgresql.TEXT(collation="C"), "postgresql")
    if "hsets" not in have:
        op.create_table('hsets',
                        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
                        sa.Column('series', sa.String(), nullable=False),
                        sa.PrimaryKeyConstraint('id'),
                        sqlite_autoincrement=True)
    if "hshared" not in have:
        op.create_table('hshared',
                        sa.Column('key', sa.Integer(), nullable=False),
                        sa.Column('text', text, nullable=False),
                        sa.Column('set_id', sa.Integer(), nullable=False),
                        sa.Column('item', sa.Integer(), nullable=False),
                        sa.Column('num', sa.Float(), nullable=True),
                        sa.Column('first', sa.Boolean(), nullable=False),
                        sa.PrimaryKeyConstraint('key', 'text', 'set_id', 'item'),
                        sqlite_with_rowid=False)
        op.create_index('ix_hshared_set', 'hshared', ['set_id', 'key', 'item', 'num'])
        op.create_index('ix_hshared_num', 'hshared', ['key', 'num', 'set_id'],
                        sqlite_where=sa.text('num IS NOT NULL'), postgresql_where=sa.text('num IS NOT NULL'))
    if "hmembers" not in have:
        op.create_table('hmembers',
                        sa.Column('set_id', sa.Integer(), nullable=False),
                        sa.Column('ino', sa.Integer(), nullable=False),
                        sa.PrimaryKeyConstraint('set_id', 'ino'),
                        sqlite_with_rowid=False)
        op.create_index('ix_hmembers_ino', 'hmembers', ['ino'], unique=True)
    make = "CREATE OR REPLACE VIEW" if op.get_bind().dialect.name == "postgresql" else "CREATE VIEW IF NOT EXISTS"
    # What queries read, bare columns only: SQLite then pushes a probe's file into each branch.
    op.execute(f'{make} hindex AS SELECT "key", text, ino, item, num, "first" FROM hvalues UNION ALL '
               'SELECT s."key", s.text, m.ino, s.item, s.num, s."first" FROM hshared s '
               'JOIN hmembers m ON m.set_id = s.set_id')
    # What the planner's estimates read: the same rows with their set, 0 for a file's own.
    op.execute(f'{make} hsample AS SELECT "key", text, ino, item, num, "first", 0 AS set_id FROM hvalues '
               'UNION ALL SELECT s."key", s.text, m.ino, s.item, s.num, s."first", s.set_id FROM hshared s '
               'JOIN hmembers m ON m.set_id = s.set_id')

def downgrade() -> None:
    """Every set's rows back into each member's own rows, then the sets go."""
    op.execute("DROP VIEW hsample")
    op.execute("DROP VIEW hindex")
    op.execute('INSERT INTO hvalues ("key", text, ino, item, num, "first") SELECT s."key", s.text, m.ino, '
               's.item, s.num, s."first" FROM hshared s JOIN hmembers m ON m.set_id = s.set_id')
    op.drop_table('hmembers')
    op.drop_table('hshared')
    op.drop_table('hsets')
