"""The metadata database's tables (the header index's are in :mod:`metaserver.index`).

Changing a table here needs an Alembic revision beside it (``metaserver/migrations``, see
:mod:`metaserver.migrate`): these definitions are what new code reads and writes, the revisions
are how an existing database gets there.
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa

metadata = sa.MetaData()

inodes = sa.Table(
    "inodes", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("parent", sa.Integer, nullable=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("is_dir", sa.Boolean, nullable=False),
    sa.Column("mode", sa.Integer, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False, default=0),
    sa.Column("nlink", sa.Integer, nullable=False, default=1),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("ctime", sa.Float, nullable=False),
    sa.Column("object_key", sa.String(64), nullable=True, index=True),
    sa.UniqueConstraint("parent", "name", name="uq_inodes_parent_name"),
)
# The directories alone, for rebuilding a metaserver's directory map (sqlbase._rebuilt_dirs):
# without it the rebuild read every inode.  The WHERE matches the query's term as each dialect
# writes it (SQLite uses a partial index only then); ``id`` makes it covering on PostgreSQL too.
sa.Index("ix_inodes_dirs", inodes.c.is_dir, inodes.c.parent, inodes.c.name, inodes.c.id,
         sqlite_where=inodes.c.is_dir.is_(True), postgresql_where=inodes.c.is_dir.is_(True))
objects = sa.Table(
    "objects", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    # Sealed objects (dgf/envelope.py): "SALT_HEX:STUDY_UID", the study whose data key seals it.
    sa.Column("seal", sa.String, nullable=True),
)
replicas = sa.Table(
    "replicas", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("site", sa.String, primary_key=True),
    sa.Column("state", sa.String, nullable=False),
    # The site's stamp of the store its receipt was for (ioserver ObjectStore.put): a delete
    # sent after the object's release removes that generation only (migration 0007).
    sa.Column("gen", sa.BigInteger, nullable=True),
)
#: The generation of each copy a release deleted (migration 0008), kept for twice a receipt's
#: life (engine.RECEIPT_TTL_S): a receipt signed before the release, for the bytes it deleted,
#: gives the archive no object or copy back.  One row per object and site, the last release's.
released_gens = sa.Table(
    "released_gens", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("site", sa.String, primary_key=True),
    sa.Column("gen", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False, index=True),
)
#: The directory tree's changes, filed under the tree version each commit moved it to (the
#: settings row ``ns.dirs_version``): another metaserver process over this database replays them
#: into its directory map instead of rebuilding the map from every directory (sqlbase).  Kind
#: ``m``ade and ``v`` (moved) name the directory's new parent and name; ``g``one neither.  Only
#: the last versions are kept (sqlbase.DIR_CHANGES_KEPT); a map older than those is rebuilt.
dir_changes = sa.Table(
    "dir_changes", metadata,
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(1), nullable=False),
    sa.Column("ino", sa.Integer, nullable=False),
    sa.Column("parent", sa.Integer, nullable=True),
    sa.Column("name", sa.String, nullable=True),
)
xattrs = sa.Table(
    "xattrs", metadata,
    sa.Column("ino", sa.Integer, primary_key=True),
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)
#: A directory's number of copies (``dgf admin replicas set``), asked for at every upload: without
#: the index below that question read every attribute of every file.  The query must name the
#: attribute as a literal (``REPLICAS_ONLY``) for SQLite to use the index.
REPLICAS_XATTR = "user.dgf.replicas"
REPLICAS_ONLY = sa.text(f"xattrs.name = '{REPLICAS_XATTR}'")
sa.Index("ix_xattrs_replicas", xattrs.c.ino, sqlite_where=sa.text(f"name = '{REPLICAS_XATTR}'"),
         postgresql_where=sa.text(f"name = '{REPLICAS_XATTR}'"))
# The identity vault: separate tables, values sealed with one data key per patient.
patients = sa.Table(
    "vault_patients", metadata,
    sa.Column("pseudonym", sa.String, primary_key=True),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
identities = sa.Table(
    "vault_identities", metadata,
    sa.Column("object_key", sa.String(64), primary_key=True),
    sa.Column("patient", sa.String, nullable=False, index=True),
    sa.Column("sealed", sa.LargeBinary, nullable=False),
    # The original's size (what an identified read returns), so an identified mount's stat
    # agrees with its reads; shown only to principals who may see identity.
    sa.Column("size", sa.BigInteger, nullable=True),
)
principals_t = sa.Table(
    "principals", metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("role", sa.String, nullable=False),
    sa.Column("public_key", sa.String, nullable=False),
    sa.Column("fingerprint", sa.String, nullable=False, unique=True),
)
sites_t = sa.Table(
    "sites", metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("host_key", sa.String, nullable=False),
    sa.Column("zone", sa.String, nullable=True),
    # Added by an admin ('dgf admin site add'): the site's own registration may not change its
    # host key or address, and declares a zone only where the admin gave none.
    sa.Column("pinned", sa.Boolean, nullable=True),
    # Set by an admin only: the site is given sealed objects and never a key or a plaintext byte.
    sa.Column("untrusted", sa.Boolean, nullable=True),
)
# One data key per study for objects sealed for untrusted sites, wrapped by the data key of the
# study's patient: erasing the patient's key makes every sealed object of theirs unreadable.
study_keys = sa.Table(
    "study_keys", metadata,
    sa.Column("study", sa.String, primary_key=True),
    sa.Column("patient", sa.String, nullable=False, index=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
settings_t = sa.Table(
    "settings", metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)
queries_t = sa.Table(
    "saved_queries", metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("xpath", sa.String, nullable=False),
    sa.Column("owner", sa.String, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
# Per-block digests of objects larger than one digest block (dgf/integrity.py), as signed by
# the site that stored them; a ranged read checks the blocks it covers against these.
# Cohort grants: a researcher sees only the files a grant's query (snapshotted when granted)
# matches, until it expires, when the archive runs grant-only.  Signed by the metaserver.
grants_t = sa.Table(
    "grants", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("principal", sa.String, nullable=False, index=True),
    sa.Column("query", sa.String, nullable=False),
    sa.Column("xpath", sa.String, nullable=False),
    sa.Column("until", sa.Float, nullable=False),
    sa.Column("granted_by", sa.String, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("token", sa.String, nullable=False),
)

AUDIT_HEAD = "audit.head"


def audit_hash(prev: str, ts: float, principal: str, action: str, target: str, outcome: str, detail: str) -> str:
    """One link of the audit chain: SHA-256 of the previous hash and the record, canonical JSON."""
    record = json.dumps([prev, repr(float(ts)), principal, action, target, outcome, detail],
                        ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(record.encode("utf-8", "surrogatepass")).hexdigest()


# Objects published with fewer copies than their directory keeps (asynchronous replication):
# sites ask for this work (site.work) and copy site to site until each has ``wanted``.
repairs = sa.Table(
    "repairs", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("wanted", sa.Integer, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
)
object_blocks = sa.Table(
    "object_blocks", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("digests", sa.LargeBinary, nullable=False),
)
# Who set each user.* attribute and how large it is: per-principal quotas are sums over this.
xattr_owners = sa.Table(
    "xattr_owners", metadata,
    sa.Column("ino", sa.Integer, primary_key=True),
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("owner", sa.String, nullable=False, index=True),
    sa.Column("size", sa.Integer, nullable=False),
)
audit_t = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("principal", sa.String, nullable=False),
    sa.Column("action", sa.String, nullable=False),
    sa.Column("target", sa.String, nullable=False),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("detail", sa.String, nullable=False, default=""),
    # SHA-256 over the previous record's hash and this record: a hash chain, so a record
    # changed, removed or moved breaks every hash after it ('dgf admin audit verify').
    sa.Column("hash", sa.String(64), nullable=True),
)
