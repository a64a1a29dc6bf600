"""The generation of each copy a release deleted, kept for two hours.

Revision ID: 0008
Revises: 0007

A site's receipt (its signed word that it stored an object) is good for an hour after the
store it names.  A client that kept one could commit it after the object's release had deleted
those bytes, publishing a name with nothing behind it.  A release now notes the generation of
each copy it deletes, and a commit or a copy's record whose receipt names that generation, or
an older one, is refused.  The notes are forgotten after twice a receipt's life.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before revisions existed is first brought to the tables the code
    # declares, this one included, then stamped with the baseline and upgraded.
    if sa.inspect(op.get_bind()).has_table("released_gens"):
        return
    op.create_table(
        "released_gens",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("site", sa.String(), primary_key=True),
        sa.Column("gen", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_released_gens_at", "released_gens", ["at"])


def downgrade() -> None:
    op.drop_index("ix_released_gens_at", table_name="released_gens")
    op.drop_table("released_gens")
