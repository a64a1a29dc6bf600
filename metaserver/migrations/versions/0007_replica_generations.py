"""Each replica's generation: the site's stamp of the store its receipt was signed for.

Revision ID: 0007
Revises: 0006

Until 2026-12-03 removing a file's last name told the client to delete its object at the sites
outright.  An upload of the same bytes (an instance sent again) could store them there between
the release and the delete, commit afterwards, and be left with a name whose bytes were gone.
A site now stamps an object each time it stores it and signs the stamp into its receipt; the
metaserver keeps it per replica and puts it into the delete capability, and a site deletes only
the generation released, never bytes stored since.  Replicas recorded before this revision have
none (NULL): theirs are deleted as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made before revisions existed is first brought to the tables the code
    # declares, this column included, then stamped with the baseline and upgraded.
    if "gen" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("replicas")}:
        return
    op.add_column("replicas", sa.Column("gen", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("gen")
