"""Series sets found by series: a header committed after its series' set joins it.

Revision ID: 0005
Revises: 0004

Until 2026-12-03 a series set held only headers committed together, so a series written over
many commits (one image per DIMSE association or STOW-RS request, or upload batches that
interleave series) kept its common rows once per commit, or in every header.  A commit now
looks up the newest set of each of its series, which needs this index.  Sets made before stay
as they are.
"""

from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # IF NOT EXISTS: a database made before revisions existed is first brought to the tables the
    # code declares, this index included, then stamped with the baseline and upgraded.
    op.execute("CREATE INDEX IF NOT EXISTS ix_hsets_series ON hsets (series, id)")


def downgrade() -> None:
    op.drop_index('ix_hsets_series', 'hsets')
