"""The directory tree's changes, kept for other metaserver processes to replay; an index of the
directories alone.

Revision ID: 0006
Revises: 0005

Until 2026-12-03 a metaserver process learnt only its own changes of the directory tree; when
another process over the same database changed it, the process rebuilt its directory map from
every directory (about a second at 250,000).  Each commit that changes the tree now files its
changes under the tree version it moves to, and the others replay them.  A database upgraded
from before starts with none kept: the first change after it is replayed, anything older is
rebuilt as before.  A rebuild reads the partial index ``ix_inodes_dirs`` instead of every inode.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before revisions existed is first brought to the tables the code
    # declares, these included, then stamped with the baseline and upgraded.
    inspector = sa.inspect(op.get_bind())
    if "ix_inodes_dirs" not in {i["name"] for i in inspector.get_indexes("inodes")}:
        op.create_index("ix_inodes_dirs", "inodes", ["is_dir", "parent", "name", "id"],
                        sqlite_where=sa.text("is_dir IS 1"), postgresql_where=sa.text("is_dir IS true"))
    if inspector.has_table("dir_changes"):
        return
    op.create_table(
        "dir_changes",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=1), nullable=False),
        sa.Column("ino", sa.Integer(), nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("version", "seq"),
    )


def downgrade() -> None:
    op.drop_table("dir_changes")
    op.drop_index("ix_inodes_dirs", "inodes")
