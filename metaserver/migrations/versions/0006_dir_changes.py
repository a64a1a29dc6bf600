"""The directory tree's changes, kept for other metaserver processes to replay.

Revision ID: 0006
Revises: 0005

Until 2026-12-03 a metaserver process learnt only its own changes of the directory tree; when
another process over the same database changed it, the process rebuilt its directory map from
every directory (about a second at 250,000).  Each commit that changes the tree now files its
changes under the tree version it moves to, and the others replay them.  A database upgraded
from before starts with none kept: the first change after it is replayed, anything older is
rebuilt as before.
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
    # declares, this one included, then stamped with the baseline and upgraded.
    if sa.inspect(op.get_bind()).has_table("dir_changes"):
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
