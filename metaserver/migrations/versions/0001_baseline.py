"""Baseline: the schema as of 2026-11-30 (generated from the table definitions of that day).

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('principal', sa.String(), nullable=False),
    sa.Column('action', sa.String(), nullable=False),
    sa.Column('target', sa.String(), nullable=False),
    sa.Column('outcome', sa.String(), nullable=False),
    sa.Column('detail', sa.String(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('grants',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('principal', sa.String(), nullable=False),
    sa.Column('query', sa.String(), nullable=False),
    sa.Column('xpath', sa.String(), nullable=False),
    sa.Column('until', sa.Float(), nullable=False),
    sa.Column('granted_by', sa.String(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('token', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_grants_principal'), ['principal'], unique=False)

    op.create_table('inodes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('is_dir', sa.Boolean(), nullable=False),
    sa.Column('mode', sa.Integer(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('nlink', sa.Integer(), nullable=False),
    sa.Column('mtime', sa.Float(), nullable=False),
    sa.Column('ctime', sa.Float(), nullable=False),
    sa.Column('object_key', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('parent', 'name', name='uq_inodes_parent_name')
    )
    with op.batch_alter_table('inodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inodes_object_key'), ['object_key'], unique=False)

    op.create_table('object_blocks',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('digests', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('objects',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('seal', sa.String(), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('principals',
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('role', sa.String(), nullable=False),
    sa.Column('public_key', sa.String(), nullable=False),
    sa.Column('fingerprint', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('name'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_table('repairs',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('wanted', sa.Integer(), nullable=False),
    sa.Column('since', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('replicas',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('site', sa.String(), nullable=False),
    sa.Column('state', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'site')
    )
    op.create_table('saved_queries',
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('xpath', sa.String(), nullable=False),
    sa.Column('owner', sa.String(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('settings',
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('value', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('sites',
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('host', sa.String(), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('host_key', sa.String(), nullable=False),
    sa.Column('zone', sa.String(), nullable=True),
    sa.Column('pinned', sa.Boolean(), nullable=True),
    sa.Column('untrusted', sa.Boolean(), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('study_keys',
    sa.Column('study', sa.String(), nullable=False),
    sa.Column('patient', sa.String(), nullable=False),
    sa.Column('wrapped', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('study')
    )
    with op.batch_alter_table('study_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_keys_patient'), ['patient'], unique=False)

    op.create_table('vault_identities',
    sa.Column('object_key', sa.String(length=64), nullable=False),
    sa.Column('patient', sa.String(), nullable=False),
    sa.Column('sealed', sa.LargeBinary(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('object_key')
    )
    with op.batch_alter_table('vault_identities', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vault_identities_patient'), ['patient'], unique=False)

    op.create_table('vault_patients',
    sa.Column('pseudonym', sa.String(), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('pseudonym')
    )
    op.create_table('xattr_owners',
    sa.Column('ino', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('owner', sa.String(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('ino', 'name')
    )
    with op.batch_alter_table('xattr_owners', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_xattr_owners_owner'), ['owner'], unique=False)

    op.create_table('xattrs',
    sa.Column('ino', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('value', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('ino', 'name')
    )
    op.create_table('hkeys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text().with_variant(sa.TEXT(collation='C'), 'postgresql'), nullable=False),
    sa.Column('has_long', sa.Boolean(), nullable=False),
    sa.Column('multi', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('path')
    )
    op.create_table('hlevels',
    sa.Column('ino', sa.Integer(), nullable=False),
    sa.Column('patient', sa.String(), nullable=False),
    sa.Column('study', sa.String(), nullable=False),
    sa.Column('series', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('ino')
    )
    op.create_table('hvalues',
    sa.Column('key', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text().with_variant(sa.TEXT(collation='C'), 'postgresql'), nullable=False),
    sa.Column('ino', sa.Integer(), nullable=False),
    sa.Column('item', sa.Integer(), nullable=False),
    sa.Column('num', sa.Float(), nullable=True),
    sa.Column('first', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'text', 'ino', 'item'),
    sqlite_with_rowid=False
    )
    with op.batch_alter_table('hvalues', schema=None) as batch_op:
        batch_op.create_index('ix_hvalues_ino', ['ino', 'key', 'item', 'num'], unique=False)
        batch_op.create_index('ix_hvalues_num', ['key', 'num', 'ino'], unique=False, sqlite_where=sa.text('num IS NOT NULL'), postgresql_where=sa.text('num IS NOT NULL'))



def downgrade() -> None:
    with op.batch_alter_table('hvalues', schema=None) as batch_op:
        batch_op.drop_index('ix_hvalues_num', sqlite_where=sa.text('num IS NOT NULL'), postgresql_where=sa.text('num IS NOT NULL'))
        batch_op.drop_index('ix_hvalues_ino')

    op.drop_table('hvalues')
    op.drop_table('hlevels')
    op.drop_table('hkeys')
    op.drop_table('xattrs')
    with op.batch_alter_table('xattr_owners', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_xattr_owners_owner'))

    op.drop_table('xattr_owners')
    op.drop_table('vault_patients')
    with op.batch_alter_table('vault_identities', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_vault_identities_patient'))

    op.drop_table('vault_identities')
    with op.batch_alter_table('study_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_keys_patient'))

    op.drop_table('study_keys')
    op.drop_table('sites')
    op.drop_table('settings')
    op.drop_table('saved_queries')
    op.drop_table('replicas')
    op.drop_table('repairs')
    op.drop_table('principals')
    op.drop_table('objects')
    op.drop_table('object_blocks')
    with op.batch_alter_table('inodes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inodes_object_key'))

    op.drop_table('inodes')
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_grants_principal'))

    op.drop_table('grants')
    op.drop_table('audit')
