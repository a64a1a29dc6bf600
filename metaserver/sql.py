"""The SQLAlchemy implementation of :class:`MetaEngine` (SQLite by default, PostgreSQL for scale).

Every write goes through :meth:`SqlEngine._txn`, one transaction with retry on conflict; reads use
a plain connection.  SQLite runs in WAL mode with writers serialised in-process, so readers never
wait for a batch commit.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from lxml import etree
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from dgf import crypto, errors
from dgf.types import Principal, Site, Stat
from metaserver import index
from metaserver.engine import MetaEngine, NewFile, norm_path
from metaserver.index import keys_t, levels_t, values_t
from metaserver.planner import Catalogue, load_catalogue
from metaserver.schema import (
    AUDIT_HEAD,
    audit_hash,
    audit_t,
    grants_t,
    identities,
    inodes,
    metadata,
    object_blocks,
    objects,
    patients,
    principals_t,
    queries_t,
    repairs,
    replicas,
    settings_t,
    sites_t,
    study_keys,
    xattr_owners,
    xattrs,
)

T = TypeVar("T")
#: The settings row counting changes of the directory tree (see SqlEngine._bump_dirs).
DIRS_VERSION = "ns.dirs_version"
#: A directory's replication factor (set by admins through ``admin.replicas.set``).
REPLICAS_XATTR = "user.dgf.replicas"
ROOT = 1

_STAT_COLS = (inodes.c.id, inodes.c.name, inodes.c.is_dir, inodes.c.mode, inodes.c.size,
              inodes.c.nlink, inodes.c.mtime, inodes.c.ctime, inodes.c.object_key)


class _Row(NamedTuple):
    """An inode row built locally after an insert, shaped like a selected row."""

    id: int
    name: str
    is_dir: bool
    mode: int
    size: int
    nlink: int
    mtime: float
    ctime: float
    object_key: str | None


# Statements on the hot paths, built once: SQLAlchemy's per-call construction of selects and
# updates cost more than SQLite executing them.
_Q_CHILD = sa.select(*_STAT_COLS).where(inodes.c.parent == sa.bindparam("b_parent"),
                                        inodes.c.name == sa.bindparam("b_name"))
_Q_CHILDREN_NAMED = sa.select(*_STAT_COLS).where(
    inodes.c.parent == sa.bindparam("b_parent"), inodes.c.name.in_(sa.bindparam("b_names", expanding=True)))
_U_NLINK = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(
    nlink=inodes.c.nlink + sa.bindparam("b_delta"), mtime=sa.bindparam("b_now"))
_U_MTIME = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(mtime=sa.bindparam("b_now"))
_U_FILE = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(
    object_key=sa.bindparam("b_key"), size=sa.bindparam("b_size"), mtime=sa.bindparam("b_now"),
    ctime=sa.bindparam("b_now"))


def _stat(path: str, row: Any) -> Stat:
    return Stat(path=path, ino=row.id, is_dir=bool(row.is_dir), mode=row.mode, size=row.size,
                mtime=row.mtime, ctime=row.ctime, nlink=row.nlink, object_key=row.object_key)


def _inserted_id(result: Any) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise errors.ServerError("the database returned no id for a new entry.")
    return int(key[0])


def _slices(keys: list[T], n: int = 500) -> Iterator[list[T]]:
    """``keys`` in slices short enough for one ``IN (...)`` list."""
    for i in range(0, len(keys), n):
        yield keys[i:i + n]


def _join(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name


class SqlEngine(MetaEngine):
    def __init__(self, url: str, db_wait_s: float = 5.0) -> None:
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]   # psycopg 3, not psycopg2
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        #: A request waits this long for a pooled connection, then is answered "busy".
        self.db_wait_s = db_wait_s
        if self.is_sqlite:
            self.engine = sa.create_engine(url, connect_args={"check_same_thread": False,
                                                              "timeout": 30},
                                           pool_size=5, max_overflow=10, pool_timeout=db_wait_s)
            sa.event.listen(self.engine, "connect", self._sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True,
                                           pool_timeout=db_wait_s)
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None
        self._local = threading.local()
        from metaserver import migrate

        self.schema_revision = migrate.upgrade(self.engine, self._legacy_schema)
        self._key_ids: dict[str, int] = {}          # committed catalogue entries, path -> id
        self._multi: set[str] = set()                # committed paths flagged multi-valued
        self._catalogue: tuple[int, Catalogue] | None = None
        self._dirs: dict[int, str] | None = None     # directory id -> path, rebuilt after changes
        self._dirs_version: str | None = None        # the database's DIRS_VERSION it was built at
        self._dir_ids_of: tuple[dict[int, str], dict[str, int]] | None = None
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(sa.select(inodes.c.id).where(inodes.c.id == ROOT)).first() is None:
                # The database assigns the id (an explicit one would not advance PostgreSQL's
                # sequence); in a fresh database the first inode is 1.
                root = _inserted_id(conn.execute(inodes.insert().values(
                    parent=None, name="", is_dir=True, mode=0o755, size=0, nlink=2, mtime=now, ctime=now)))
                if root != ROOT:
                    raise errors.ServerError(f"the database gave the root directory id {root}, not {ROOT}; "
                                             "use an empty database.")

    @staticmethod
    def _legacy_schema(conn: Connection) -> None:
        """A database made before schema revisions (metaserver/migrate.py), brought to the
        baseline: the tables and the columns added since it was created."""
        metadata.create_all(conn)
        index.metadata.create_all(conn)
        inspector = sa.inspect(conn)
        for table, column, sql_type in ((identities, "size", "BIGINT"), (sites_t, "zone", "VARCHAR"),
                                          (sites_t, "pinned", "BOOLEAN"), (audit_t, "hash", "VARCHAR(64)"),
                                          (sites_t, "untrusted", "BOOLEAN"), (objects, "seal", "VARCHAR")):
            if column not in {c["name"] for c in inspector.get_columns(table.name)}:
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column} {sql_type}"))

    @staticmethod
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA cache_size=-131072")  # 128 MiB: the header index is large
        cur.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- the one transaction helper -------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A pooled connection, or :class:`~dgf.errors.Busy` when every one stays taken for
        ``db_wait_s`` (never a hang, never a misleading error further up)."""
        try:
            conn = self.engine.connect()
        except SATimeoutError as exc:
            raise self._busy() from exc
        with conn:
            yield conn

    def _busy(self) -> errors.Busy:
        return errors.Busy(f"the metadata server is busy (every database connection stayed in use for "
                           f"{self.db_wait_s:.0f} s); retry in a moment.")

    @contextlib.contextmanager
    def audited(self, principal: str, action: str = "", target: str = "", detail: str = "",
                released: str = "") -> Iterator[None]:
        """Audit the next transaction of this thread in that same transaction: the entry
        (``action`` on ``target``) and, with ``released``, one ``object.release`` entry per object
        it frees.  If the transaction fails, no record claims it happened; if the record cannot
        be written, the action does not happen."""
        self._local.audit = (principal, action, target, detail, released)
        try:
            yield
        finally:
            self._local.audit = None

    def _audit_in(self, conn: Connection, released: dict[str, list[str]] | None) -> None:
        pending = getattr(self._local, "audit", None)
        if pending is None:
            return
        principal, action, target, detail, why = pending
        rows = [(principal, action, target, "ok", detail)] if action else []
        if why and released:
            rows += [(principal, "object.release", key, "ok", why) for key in released]
        if rows:
            self._write_audit(conn, rows)

    def _write_audit(self, conn: Connection, rows: list[tuple[str, str, str, str, str]]) -> None:
        """Append audit records to the hash chain, in the caller's transaction.  The chain's
        head is locked for the rest of the transaction (FOR UPDATE; SQLite writes one at a
        time anyway), so records chain in the order they commit, whichever metaserver writes."""
        head = conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == AUDIT_HEAD)
                            .with_for_update()).scalar()
        if head is None:
            conn.execute(self._insert_ignore(settings_t), [{"name": AUDIT_HEAD, "value": ""}])
            head = conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == AUDIT_HEAD)
                                .with_for_update()).scalar() or ""
        now = time.time()
        out = []
        for p, a, t, o, d in rows:
            head = audit_hash(head, now, p, a, t, o, d)
            out.append({"ts": now, "principal": p, "action": a, "target": t, "outcome": o, "detail": d, "hash": head})
        conn.execute(audit_t.insert(), out)
        conn.execute(settings_t.update().where(settings_t.c.name == AUDIT_HEAD).values(value=head))

    def audit_verify(self) -> dict[str, Any]:
        """Walk the audit chain: the first record whose hash does not follow from the one
        before, or a head that is not the last record's hash (records cut off the end)."""
        def run(conn: Connection) -> dict[str, Any]:
            head, legacy, checked, after = "", 0, 0, 0
            while True:
                page = conn.execute(sa.select(audit_t).where(audit_t.c.id > after).order_by(audit_t.c.id)
                                    .limit(5000)).all()
                if not page:
                    break
                for r in page:
                    after = r.id
                    if r.hash is None and checked == 0:
                        legacy += 1              # written before records were chained
                        continue
                    expected = audit_hash(head, r.ts, r.principal, r.action, r.target, r.outcome, r.detail)
                    if r.hash != expected:
                        return {"records": checked + legacy, "legacy": legacy, "broken_at": r.id,
                                "why": "its hash does not follow from the record before it (changed, removed "
                                       "or moved records)"}
                    head = expected
                    checked += 1
            stored = conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == AUDIT_HEAD)).scalar()
            if checked and (stored or "") != head:
                return {"records": checked + legacy, "legacy": legacy, "broken_at": after,
                        "why": "the chain's head is not the last record's hash (records removed from the end)"}
            return {"records": checked + legacy, "legacy": legacy, "broken_at": None, "why": ""}
        return self._read(run)

    def _txn(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction, retrying on lock or serialization conflicts."""
        for attempt in range(6):
            try:
                with self._write_lock or contextlib.nullcontext(), self._begin() as conn:
                    conn.info.pop("dgf.after", None)
                    result = fn(conn)
                    self._audit_in(conn, conn.info.get("dgf.released"))
                    if conn.info.get("dgf.after", {}).get("dirs"):
                        self._bump_dirs(conn)
                    after = conn.info.pop("dgf.after", {})
                self._local.audit = None         # written once, with the first transaction
                # Committed: now in-process caches may learn what the transaction did.
                self._key_ids.update(after.get("keys", {}))
                self._multi.update(after.get("multi", ()))
                if after.get("dirs"):
                    self._dirs = None
                return result
            except (OperationalError, DBAPIError) as exc:
                if attempt == 5 or not self._retryable(exc):
                    raise
                time.sleep(0.01 * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _retryable(exc: DBAPIError) -> bool:
        text = str(exc.orig).lower() if exc.orig is not None else ""
        code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
        return "locked" in text or "busy" in text or code in ("40001", "40P01")

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self._connect() as conn, conn.begin():
            yield conn

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self._connect() as conn:
            return fn(conn)

    def _insert_ignore(self, table: sa.Table) -> Any:
        dialect = postgresql if not self.is_sqlite else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    # -- path resolution ------------------------------------------------------------------

    def _resolve(self, conn: Connection, path: str, cache: dict[str, Any] | None = None) -> Any:
        if cache is not None and path in cache:
            return cache[path]
        row: Any = conn.execute(sa.select(*_STAT_COLS).where(inodes.c.id == ROOT)).one()
        walked = ""
        for part in [p for p in path.split("/") if p]:
            if not row.is_dir:
                raise errors.NotADirectory(f"{walked} is not a directory.")
            walked += "/" + part
            if cache is not None and walked in cache:
                row = cache[walked]
                continue
            row = conn.execute(sa.select(*_STAT_COLS).where(
                inodes.c.parent == row.id, inodes.c.name == part)).first()
            if row is None:
                raise errors.NotFound(f"{walked} does not exist.")
            if cache is not None and row.is_dir:
                cache[walked] = row
        return row

    def _resolve_dir(self, conn: Connection, path: str, cache: dict[str, Any] | None = None) -> Any:
        row = self._resolve(conn, path, cache)
        if not row.is_dir:
            raise errors.NotADirectory(f"{path} is not a directory.")
        return row

    def _child(self, conn: Connection, parent_id: int, name: str) -> Any:
        return conn.execute(_Q_CHILD, {"b_parent": parent_id, "b_name": name}).first()

    def _new_dir(self, conn: Connection, parent_id: int, name: str, mode: int) -> Any:
        conn.info.setdefault("dgf.after", {})["dirs"] = True
        now = time.time()
        ino = _inserted_id(conn.execute(inodes.insert().values(
            parent=parent_id, name=name, is_dir=True, mode=mode, size=0, nlink=2,
            mtime=now, ctime=now)))
        conn.execute(_U_NLINK, {"b_id": parent_id, "b_delta": 1, "b_now": now})
        return _Row(ino, name, True, mode, 0, 2, now, now, None)

    def _makedirs(self, conn: Connection, path: str, cache: dict[str, Any]) -> Any:
        if path in cache:
            return cache[path]
        if path == "/":
            row = self._resolve(conn, "/")
        else:
            parent_path, name = path.rsplit("/", 1)
            parent = self._makedirs(conn, parent_path or "/", cache)
            row = self._child(conn, parent.id, name)
            if row is None:
                row = self._new_dir(conn, parent.id, name, 0o755)
            elif not row.is_dir:
                raise errors.NotADirectory(f"{path} exists and is not a directory.")
        cache[path] = row
        return row

    # -- namespace steps ------------------------------------------------------------------

    def _looked_up(self, conn: Connection, path: str) -> Any:
        """``path``'s row for a read: its parent directory from the directory map (rebuilt only
        when the tree changes), then one query by (parent, name), instead of one per component
        from the root.  Anything the map cannot answer takes the walk, with its precise errors."""
        parent, _, name = path.rstrip("/").rpartition("/")
        if name:
            ids = self._dir_ids(conn)
            pid = ids.get(parent or "/")
            if pid is not None:
                row = conn.execute(_Q_CHILD, {"b_parent": pid, "b_name": name}).first()
                if row is not None:
                    return row
        return self._resolve(conn, path)

    def _dir_ids(self, conn: Connection) -> dict[str, int]:
        """Every directory's id by path (the inverse of ``_dir_paths``, kept with it)."""
        dirs = self._dir_paths(conn)
        cached = self._dir_ids_of
        if cached is None or cached[0] is not dirs:
            cached = self._dir_ids_of = (dirs, {p: i for i, p in dirs.items()})
        return cached[1]

    def _do_stat(self, path: str) -> Stat:
        return _stat(path, self._read(lambda c: self._looked_up(c, path)))

    def _do_readdir(self, path: str) -> list[Stat]:
        def run(conn: Connection) -> list[Stat]:
            d = self._looked_up(conn, path)
            if not d.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            rows = conn.execute(sa.select(*_STAT_COLS).where(inodes.c.parent == d.id)
                                .order_by(inodes.c.name))
            return [_stat(_join(path, r.name), r) for r in rows]
        return self._read(run)

    def _do_mkdir(self, path: str, mode: int, parents: bool) -> Stat:
        def run(conn: Connection) -> Stat:
            conn.info.setdefault("dgf.after", {})["dirs"] = True
            if parents:
                row = self._makedirs(conn, path, {})
                return _stat(path, row)
            parent_path, name = path.rsplit("/", 1)
            parent = self._resolve_dir(conn, parent_path or "/")
            if self._child(conn, parent.id, name) is not None:
                raise errors.AlreadyExists(f"{path} already exists.")
            return _stat(path, self._new_dir(conn, parent.id, name, mode))
        return self._txn(run)

    def _do_rename(self, src: str, dst: str) -> dict[str, list[str]]:
        def run(conn: Connection) -> dict[str, list[str]]:
            conn.info.setdefault("dgf.after", {})["dirs"] = True
            s = self._resolve(conn, src)
            if (dst + "/").startswith(src + "/"):
                raise errors.UsageError(f"cannot move {src!r} into itself.")
            dparent_path, dname = dst.rsplit("/", 1)
            dparent = self._resolve_dir(conn, dparent_path or "/")
            sparent_id = conn.execute(sa.select(inodes.c.parent).where(inodes.c.id == s.id)).scalar_one()
            existing = self._child(conn, dparent.id, dname)
            now = time.time()
            if existing is not None:
                # POSIX rename(2): replace a file by a file, or an empty directory by a directory.
                if s.is_dir and not existing.is_dir:
                    raise errors.NotADirectory(f"{dst} is not a directory.")
                if not s.is_dir and existing.is_dir:
                    raise errors.IsADirectory(f"{dst} is a directory.")
                if existing.is_dir:
                    if conn.execute(sa.select(inodes.c.id).where(inodes.c.parent == existing.id).limit(1)).first():
                        raise errors.DirectoryNotEmpty(f"{dst} is not empty.")
                    conn.execute(inodes.update().where(inodes.c.id == dparent.id).values(nlink=inodes.c.nlink - 1))
                self._drop_inode(conn, existing.id)
            conn.execute(inodes.update().where(inodes.c.id == s.id).values(
                parent=dparent.id, name=dname, ctime=now))
            if s.is_dir and sparent_id != dparent.id:
                conn.execute(inodes.update().where(inodes.c.id == sparent_id).values(nlink=inodes.c.nlink - 1))
                conn.execute(inodes.update().where(inodes.c.id == dparent.id).values(nlink=inodes.c.nlink + 1))
            conn.execute(inodes.update().where(inodes.c.id.in_({sparent_id, dparent.id})).values(mtime=now))
            return self._release(conn, {existing.object_key} if existing is not None else set())
        return self._txn(run)

    def _release(self, conn: Connection, keys: set[str]) -> dict[str, list[str]]:
        """Forget the objects among ``keys`` that no file references any more.

        Their object, replica and identity rows go in the caller's transaction; the result maps
        each released key to the sites that still hold its bytes, for the caller to delete there.
        """
        keys = {k for k in keys if k}
        if not keys:
            return {}
        used = {r.object_key for r in conn.execute(
            sa.select(inodes.c.object_key).where(inodes.c.object_key.in_(keys)).distinct())}
        gone = sorted(keys - used)
        if not gone:
            return {}
        out: dict[str, list[str]] = {k: [] for k in gone}
        for r in conn.execute(sa.select(replicas.c.key, replicas.c.site).where(replicas.c.key.in_(gone))):
            out[r.key].append(r.site)
        conn.execute(replicas.delete().where(replicas.c.key.in_(gone)))
        conn.execute(repairs.delete().where(repairs.c.key.in_(gone)))
        conn.execute(objects.delete().where(objects.c.key.in_(gone)))
        conn.execute(object_blocks.delete().where(object_blocks.c.key.in_(gone)))
        conn.execute(identities.delete().where(identities.c.object_key.in_(gone)))
        conn.info.setdefault("dgf.released", {}).update(out)
        return out

    def _drop_inode(self, conn: Connection, ino: int) -> None:
        conn.execute(xattrs.delete().where(xattrs.c.ino == ino))
        conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == ino))
        self._unindex(conn, [ino])
        conn.execute(inodes.delete().where(inodes.c.id == ino))

    # -- the header index -----------------------------------------------------------------

    def _unindex(self, conn: Connection, inos: list[int]) -> None:
        for i in range(0, len(inos), 500):
            chunk = inos[i:i + 500]
            conn.execute(values_t.delete().where(values_t.c.ino.in_(chunk)))
            conn.execute(levels_t.delete().where(levels_t.c.ino.in_(chunk)))

    def _index(self, conn: Connection, headers: list[tuple[int, bytes]]) -> None:
        """Index XML headers in the caller's transaction (see metaserver/index.py)."""
        if not headers:
            return
        indexed = []
        for ino, xml in headers:
            try:
                indexed.append((ino, index.index_header(xml)))
            except (ValueError, etree.XMLSyntaxError) as exc:
                raise errors.UsageError(f"an XML header is not well-formed ({exc}).") from exc
        ids = self._key_id_map(conn, {r[0] for _, h in indexed for r in h.rows},
                               set().union(*(h.long_keys for _, h in indexed)),
                               set().union(*(h.multi_keys for _, h in indexed)))
        # The one hot insert (dozens of rows per header) skips SQLAlchemy's per-row processing.
        rows = [(ids[k], t, ino, i, n, f) for ino, h in indexed for k, t, n, f, i in h.rows]
        rows.sort(key=lambda r: (r[0], r[1]))     # in key order: each index page is touched once
        if self.is_sqlite:
            conn.exec_driver_sql('INSERT INTO hvalues ("key", text, ino, item, num, "first") VALUES (?, ?, ?, ?, ?, ?)',
                                 rows)
        else:
            with conn.connection.driver_connection.cursor().copy(  # type: ignore[union-attr]
                    'COPY hvalues ("key", text, ino, item, num, "first") FROM STDIN') as copy:
                for row in rows:
                    copy.write_row(row)
        conn.execute(levels_t.insert(), [{"ino": ino, "patient": h.patient, "study": h.study,
                                          "series": h.series} for ino, h in indexed])

    def _key_id_map(self, conn: Connection, paths: set[str], long_paths: set[str],
                    multi_paths: set[str]) -> dict[str, int]:
        """Catalogue ids for ``paths``, adding new ones in this transaction.  The in-process
        cache learns them only from rows read back, so a rolled-back insert leaves no trace."""
        missing = paths - self._key_ids.keys()
        out = {p: self._key_ids[p] for p in paths - missing}
        if missing:
            conn.execute(self._insert_ignore(keys_t), [{"path": p, "has_long": False, "multi": False}
                                                       for p in sorted(missing)])
            for r in conn.execute(sa.select(keys_t.c.id, keys_t.c.path).where(keys_t.c.path.in_(missing))):
                out[r.path] = r.id
        if long_paths:
            conn.execute(keys_t.update().where(keys_t.c.path.in_(long_paths)).values(has_long=True))
        flagged = multi_paths - self._multi
        if flagged:
            conn.execute(keys_t.update().where(keys_t.c.path.in_(flagged)).values(multi=True))
            conn.info.setdefault("dgf.after", {}).setdefault("multi", set()).update(flagged)
        if missing:
            conn.info.setdefault("dgf.after", {}).setdefault("keys", {}).update({p: out[p] for p in missing})
        return out

    def catalogue(self, conn: Connection) -> Catalogue:
        """The catalogue of indexed paths, reloaded when it has grown or changed."""
        stamp = conn.execute(sa.select(sa.func.count(), sa.func.sum(sa.cast(keys_t.c.has_long, sa.Integer)),
                                       sa.func.sum(sa.cast(keys_t.c.multi, sa.Integer)))
                             .select_from(keys_t)).one()
        version = hash(tuple(stamp))
        if self._catalogue is None or self._catalogue[0] != version:
            cat = load_catalogue(conn)
            self._catalogue = (version, cat)
            self._key_ids.update({p: i for p, (i, _) in cat.keys.items()})
        return self._catalogue[1]

    def _do_unlink(self, path: str) -> dict[str, list[str]]:
        def run(conn: Connection) -> dict[str, list[str]]:
            row = self._resolve(conn, path)
            if row.is_dir:
                raise errors.IsADirectory(f"{path} is a directory; use rmdir.")
            self._drop_inode(conn, row.id)
            parent_path = path.rsplit("/", 1)[0] or "/"
            conn.execute(inodes.update().where(inodes.c.id == self._resolve(conn, parent_path).id)
                         .values(mtime=time.time()))
            return self._release(conn, {row.object_key})
        return self._txn(run)

    def _do_rmdir(self, path: str) -> None:
        def run(conn: Connection) -> None:
            conn.info.setdefault("dgf.after", {})["dirs"] = True
            row = self._resolve(conn, path)
            if not row.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            if conn.execute(sa.select(inodes.c.id).where(inodes.c.parent == row.id).limit(1)).first():
                raise errors.DirectoryNotEmpty(f"{path} is not empty.")
            self._drop_inode(conn, row.id)
            parent = self._resolve(conn, path.rsplit("/", 1)[0] or "/")
            conn.execute(inodes.update().where(inodes.c.id == parent.id).values(
                nlink=inodes.c.nlink - 1, mtime=time.time()))
        self._txn(run)

    def _do_rmtree(self, path: str) -> tuple[int, dict[str, list[str]]]:
        def run(conn: Connection) -> tuple[int, dict[str, list[str]]]:
            conn.info.setdefault("dgf.after", {})["dirs"] = True
            top = self._resolve(conn, path)
            if not top.is_dir:
                raise errors.NotADirectory(f"{path} is not a directory.")
            files: list[int] = []
            dirs: list[int] = [top.id]
            keys: set[str] = set()
            frontier = [top.id]
            while frontier:                      # the tree, a level at a time
                below: list[int] = []
                for part in _slices(frontier):
                    for r in conn.execute(sa.select(inodes.c.id, inodes.c.is_dir, inodes.c.object_key)
                                          .where(inodes.c.parent.in_(part))):
                        if r.is_dir:
                            below.append(r.id)
                        else:
                            files.append(r.id)
                            keys.add(r.object_key)
                dirs.extend(below)
                frontier = below
            doomed = files + dirs
            self._unindex(conn, files)
            for part in _slices(doomed):
                conn.execute(xattrs.delete().where(xattrs.c.ino.in_(part)))
                conn.execute(xattr_owners.delete().where(xattr_owners.c.ino.in_(part)))
            for part in _slices(files + dirs[::-1]):     # children first
                conn.execute(inodes.delete().where(inodes.c.id.in_(part)))
            parent = self._resolve(conn, path.rsplit("/", 1)[0] or "/")
            conn.execute(inodes.update().where(inodes.c.id == parent.id).values(
                nlink=inodes.c.nlink - 1, mtime=time.time()))
            return len(files), self._release(conn, keys)
        return self._txn(run)

    def _do_chmod(self, path: str, mode: int) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            conn.execute(inodes.update().where(inodes.c.id == row.id).values(mode=mode, ctime=time.time()))
        self._txn(run)

    def _do_create_files(self, files: list[NewFile], replace: bool) -> tuple[list[Stat], dict[str, list[str]]]:
        def run(conn: Connection) -> tuple[list[Stat], dict[str, list[str]]]:
            # The directory map changes only if a directory is made (_new_dir marks it).
            now = time.time()
            dirs: dict[str, Any] = {}
            by_parent: dict[str, list[NewFile]] = {}
            if len({f.path for f in files}) != len(files):
                raise errors.UsageError("a commit names the same path twice.")
            for f in files:
                by_parent.setdefault(f.path.rsplit("/", 1)[0] or "/", []).append(f)
            new_rows: list[dict[str, Any]] = []
            new_files: list[NewFile] = []
            inos: dict[str, int] = {}
            replaced: set[str] = set()
            for parent_path, group in by_parent.items():
                parent = self._makedirs(conn, parent_path, dirs)
                names = [f.path.rsplit("/", 1)[1] for f in group]
                existing: dict[str, Any] = {r.name: r for r in conn.execute(
                    _Q_CHILDREN_NAMED, {"b_parent": parent.id, "b_names": names})}
                for f, name in zip(group, names):
                    old = existing.get(name)
                    if old is None:
                        new_rows.append({"parent": parent.id, "name": name, "is_dir": False, "mode": f.mode,
                                         "size": f.size, "nlink": 1, "mtime": now, "ctime": now,
                                         "object_key": f.object_key})
                        new_files.append(f)
                        existing[name] = _Row(0, name, False, f.mode, f.size, 1, now, now, f.object_key)
                        continue
                    if old.is_dir:
                        raise errors.IsADirectory(f"{f.path} is a directory.")
                    if old.object_key != f.object_key:
                        if not replace:
                            raise errors.AlreadyExists(f"{f.path} already exists with other content; remove it first.")
                        replaced.add(old.object_key)
                    if old.id:
                        conn.execute(_U_FILE, {"b_id": old.id, "b_key": f.object_key, "b_size": f.size, "b_now": now})
                        inos[f.path] = old.id
            if new_rows:
                # One multi-row INSERT ... RETURNING, ids in parameter order.
                result = conn.execute(inodes.insert().returning(inodes.c.id, sort_by_parameter_order=True),
                                      new_rows)
                for f, row in zip(new_files, result):
                    inos[f.path] = row.id
            obj_rows = [{"key": f.object_key, "size": f.stored_size or f.size, "created": now, "seal": f.seal}
                        for f in files]
            rep_rows = [{"key": f.object_key, "site": site, "state": "ok"}
                        for f in files for site in dict.fromkeys((f.site, *f.copies))]
            id_rows = [{"object_key": f.object_key, "patient": f.patient, "sealed": f.identity,
                        "size": f.original_size}
                       for f in files if f.identity is not None and f.patient is not None]
            xa_rows = [{"ino": inos[f.path], "name": xname, "value": value}
                       for f in files for xname, value in f.xattrs.items()]
            for table, rows in ((objects, obj_rows), (identities, id_rows)):
                if rows:
                    conn.execute(self._insert_ignore(table), rows)
            # A fresh receipt proves the site holds verified bytes: a replica quarantined
            # earlier and now re-uploaded is healthy again.
            dialect = postgresql if not self.is_sqlite else sqlite
            ins = dialect.insert(replicas)
            conn.execute(ins.on_conflict_do_update(index_elements=[replicas.c.key, replicas.c.site],
                                                   set_={"state": ins.excluded.state}), rep_rows)
            repair_rows = [{"key": f.object_key, "wanted": f.wanted, "since": now} for f in files
                           if f.wanted > len(dict.fromkeys((f.site, *f.copies)))]
            if repair_rows:
                conn.execute(self._insert_ignore(repairs), repair_rows)
            block_rows = [{"key": f.object_key, "digests": f.blocks} for f in files if f.blocks]
            if block_rows:
                conn.execute(self._insert_ignore(object_blocks), block_rows)
            if xa_rows:
                conn.execute(xattrs.delete().where(xattrs.c.ino.in_({r["ino"] for r in xa_rows}),
                                                   xattrs.c.name.in_({r["name"] for r in xa_rows})))
                conn.execute(xattrs.insert(), xa_rows)
                headers = [(inos[f.path], f.xattrs[index.HEADER_XATTR]) for f in files
                           if index.HEADER_XATTR in f.xattrs]
                self._unindex(conn, [ino for ino, _ in headers])
                self._index(conn, headers)
            if dirs:
                conn.execute(_U_MTIME, [{"b_id": d.id, "b_now": now} for d in dirs.values()])
            out = [Stat(f.path, inos[f.path], False, f.mode, f.size, now, now, 1, f.object_key) for f in files]
            return out, self._release(conn, replaced)
        return self._txn(run)

    def check_files(self, files: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """What the archive already holds for ``(path, object key, SOP Instance UID)`` entries,
        before their bytes are sent, one ``(state, detail)`` each:

        - ``new``: nothing; send it.
        - ``stored``: the path holds this object, with a healthy replica.
        - ``conflict``: the path holds something else (detail: why).
        - ``link``: the object is stored (another path holds the same bytes); detail: the site
          with a healthy replica.  The path is published as a second name of that object.
        - ``instance``: another version of the instance (same SOP Instance UID, other bytes)
          is stored; detail: its path."""
        def run(conn: Connection) -> list[tuple[str, str]]:
            at_path: dict[str, Any] = {}
            by_parent: dict[str, list[str]] = {}
            for path, _, _ in files:
                path = norm_path(path)
                by_parent.setdefault(path.rsplit("/", 1)[0] or "/", []).append(path)
            cache: dict[str, Any] = {}
            for parent_path, paths in by_parent.items():
                try:
                    parent = self._resolve_dir(conn, parent_path, cache)
                except (errors.NotFound, errors.NotADirectory):
                    continue
                names = {p.rsplit("/", 1)[1]: p for p in paths}
                for row in conn.execute(_Q_CHILDREN_NAMED, {"b_parent": parent.id, "b_names": list(names)}):
                    at_path[names[row.name]] = row
            keys = sorted({key for _, key, _ in files})
            healthy: dict[str, str] = {}
            for part in _slices(keys):
                for r in conn.execute(sa.select(replicas.c.key, replicas.c.site).where(
                        replicas.c.key.in_(part), replicas.c.state == "ok")):
                    healthy.setdefault(r.key, r.site)
            uids = sorted({uid for _, key, uid in files if uid and key not in healthy})
            instances: dict[str, str] = {}       # uid -> path of a stored version
            hkey = conn.execute(sa.select(keys_t.c.id).where(
                keys_t.c.path == "/DicomHeader/SOPInstanceUID")).scalar() if uids else None
            if hkey is not None:
                found = conn.execute(sa.select(values_t.c.text, inodes.c.parent, inodes.c.name)
                                     .join(inodes, inodes.c.id == values_t.c.ino)
                                     .where(values_t.c.key == hkey, values_t.c.item == 0,
                                            values_t.c.text.in_(uids))).all()
                if found:
                    dirs = self._dir_paths(conn)
                    for text, parent_id, name in found:
                        instances.setdefault(text, _join(dirs.get(parent_id, "/"), name))
            out: list[tuple[str, str]] = []
            for path, key, uid in files:
                path = norm_path(path)
                hit: Any = at_path.get(path)
                if hit is not None and hit.is_dir:
                    out.append(("conflict", f"{path} is a directory"))
                elif hit is not None and hit.object_key != key:
                    out.append(("conflict", f"{path} already exists with other content"))
                elif key in healthy:
                    out.append(("stored", "") if hit is not None else ("link", healthy[key]))
                elif uid in instances and instances[uid] != path:
                    out.append(("instance", instances[uid]))
                else:
                    out.append(("new", ""))
            return out
        return self._read(run)

    def add_patient_keys(self, wrapped: dict[str, bytes]) -> None:
        """Store the wrapped data keys of new patients in one transaction (existing ones win)."""
        if wrapped:
            now = time.time()
            self._txn(lambda c: c.execute(self._insert_ignore(patients), [
                {"pseudonym": k, "wrapped_key": v, "created": now} for k, v in wrapped.items()]))

    def patient_keys(self, names: list[str]) -> dict[str, bytes]:
        def run(conn: Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for i in range(0, len(names), 500):
                for r in conn.execute(sa.select(patients.c.pseudonym, patients.c.wrapped_key).where(
                        patients.c.pseudonym.in_(names[i:i + 500]))):
                    out[r.pseudonym] = bytes(r.wrapped_key)
            return out
        return self._read(run)

    # -- xattrs ---------------------------------------------------------------------------

    def _do_getxattr(self, path: str, name: str) -> bytes:
        def run(conn: Connection) -> bytes:
            row = self._resolve(conn, path)
            value = conn.execute(sa.select(xattrs.c.value).where(
                xattrs.c.ino == row.id, xattrs.c.name == name)).scalar()
            if value is None:
                raise errors.NoAttribute(f"{path} has no extended attribute {name!r}.")
            return bytes(value)
        return self._read(run)

    def _do_listxattr(self, path: str) -> list[str]:
        def run(conn: Connection) -> list[str]:
            row = self._resolve(conn, path)
            return [r.name for r in conn.execute(sa.select(xattrs.c.name).where(
                xattrs.c.ino == row.id).order_by(xattrs.c.name))]
        return self._read(run)

    def _do_setxattr(self, path: str, name: str, value: bytes, owner: str | None = None,
                     quota: tuple[int, int] | None = None, guard: bool = False) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            if guard:
                self._check_owner(conn, row.id, path, name, owner, "change")
            if owner is not None:
                self._charge(conn, row.id, name, len(value), owner, quota)
            conn.execute(xattrs.delete().where(xattrs.c.ino == row.id, xattrs.c.name == name))
            conn.execute(xattrs.insert().values(ino=row.id, name=name, value=value))
            if name == index.HEADER_XATTR:
                self._unindex(conn, [row.id])
                self._index(conn, [(row.id, value)])
        self._txn(run)

    def _do_removexattr(self, path: str, name: str, by: str | None = None) -> None:
        def run(conn: Connection) -> None:
            row = self._resolve(conn, path)
            if by is not None:
                self._check_owner(conn, row.id, path, name, by, "remove")
            if conn.execute(xattrs.delete().where(xattrs.c.ino == row.id, xattrs.c.name == name)).rowcount == 0:
                raise errors.NoAttribute(f"{path} has no extended attribute {name!r}.")
            conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == row.id, xattr_owners.c.name == name))
            if name == index.HEADER_XATTR:
                self._unindex(conn, [row.id])
        self._txn(run)

    @staticmethod
    def _check_owner(conn: Connection, ino: int, path: str, name: str, who: str | None, doing: str) -> None:
        """Refuse to let ``who`` change an attribute another principal set."""
        setter = conn.execute(sa.select(xattr_owners.c.owner).where(
            xattr_owners.c.ino == ino, xattr_owners.c.name == name)).scalar()
        if setter is not None and setter != who:
            raise errors.PermissionDenied(f"{name} on {path} was set by {setter!r}; only they or an admin "
                                          f"may {doing} it.")

    def _charge(self, conn: Connection, ino: int, name: str, size: int, owner: str,
                quota: tuple[int, int] | None) -> None:
        """Record ``owner`` as the setter of (ino, name), within its quota of (count, bytes)."""
        old = conn.execute(sa.select(xattr_owners.c.size).where(
            xattr_owners.c.ino == ino, xattr_owners.c.name == name, xattr_owners.c.owner == owner)).scalar()
        if quota is not None:
            count, total = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(xattr_owners.c.size), 0))
                                        .where(xattr_owners.c.owner == owner)).one()
            count += 0 if old is not None else 1
            total += size - (old or 0)
            if count > quota[0]:
                raise errors.LimitExceeded(f"principal {owner!r} would hold {count} extended attributes; "
                                           f"the limit xattrs_per_principal is {quota[0]}.")
            if total > quota[1]:
                raise errors.LimitExceeded(f"principal {owner!r} would hold {total} bytes of extended attributes; "
                                           f"the limit xattr_bytes_per_principal is {quota[1]}.")
        conn.execute(xattr_owners.delete().where(xattr_owners.c.ino == ino, xattr_owners.c.name == name))
        conn.execute(xattr_owners.insert().values(ino=ino, name=name, owner=owner, size=size))

    # -- objects and query ----------------------------------------------------------------

    def object_blocks(self, keys: list[str]) -> dict[str, bytes]:
        """The hash lists of those of ``keys`` that have one (objects over one block)."""
        def run(conn: Connection) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            for part in _slices(keys):
                for r in conn.execute(sa.select(object_blocks.c.key, object_blocks.c.digests).where(
                        object_blocks.c.key.in_(part))):
                    out[r.key] = bytes(r.digests)
            return out
        return self._read(run)

    def set_replica_state(self, site: str, keys: list[str], state: str) -> int:
        """Mark ``site``'s replicas of ``keys`` (e.g. quarantined: readers stop using them)."""
        def run(conn: Connection) -> int:
            n = 0
            for part in _slices(keys):
                n += conn.execute(replicas.update().where(replicas.c.site == site, replicas.c.key.in_(
                    part)).values(state=state)).rowcount
            return n
        return self._txn(run)

    def replica_states(self, key: str) -> list[tuple[str, str]]:
        return self._read(lambda c: [(r.site, r.state) for r in c.execute(
            sa.select(replicas.c.site, replicas.c.state).where(replicas.c.key == key).order_by(replicas.c.site))])

    def replica_rows(self, keys: list[str]) -> dict[str, list[tuple[str, str]]]:
        return self._read(lambda conn: self._replica_rows(conn, keys))

    @staticmethod
    def _replica_rows(conn: Connection, keys: list[str]) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {k: [] for k in keys}
        for part in _slices(keys):
            for r in conn.execute(sa.select(replicas.c.key, replicas.c.site, replicas.c.state).where(
                    replicas.c.key.in_(part)).order_by(replicas.c.site)):
                out[r.key].append((r.site, r.state))
        return out

    def add_replica(self, key: str, site: str) -> bool:
        def run(conn: Connection) -> bool:
            if conn.execute(sa.select(objects.c.key).where(objects.c.key == key)).first() is None:
                return False
            dialect = postgresql if not self.is_sqlite else sqlite
            ins = dialect.insert(replicas)
            conn.execute(ins.on_conflict_do_update(index_elements=[replicas.c.key, replicas.c.site],
                                                   set_={"state": ins.excluded.state}),
                         [{"key": key, "site": site, "state": "ok"}])
            return True
        return self._txn(run)

    def add_grant(self, principal: str, query: str, xpath: str, until: float, by: str,
                  sign: Callable[[int], str]) -> int:
        """Record a grant; ``sign(id)`` makes its signature once the id is known."""
        def run(conn: Connection) -> int:
            gid = _inserted_id(conn.execute(grants_t.insert().values(
                principal=principal, query=query, xpath=xpath, until=until, granted_by=by,
                created=time.time(), token="")))
            conn.execute(grants_t.update().where(grants_t.c.id == gid).values(token=sign(gid)))
            return gid
        return self._txn(run)

    def grants(self, principal: str | None = None) -> list[dict[str, Any]]:
        def run(conn: Connection) -> list[dict[str, Any]]:
            q = sa.select(grants_t).order_by(grants_t.c.id)
            if principal is not None:
                q = q.where(grants_t.c.principal == principal)
            return [dict(r._mapping) for r in conn.execute(q)]
        return self._read(run)

    def remove_grant(self, gid: int) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(grants_t.delete().where(grants_t.c.id == gid)).rowcount == 0:
                raise errors.NotFound(f"no grant with id {gid}.")
        self._txn(run)

    def object_header(self, key: str) -> bytes | None:
        """The XML header on record for object ``key`` (any of its paths'), if any."""
        def run(conn: Connection) -> bytes | None:
            value = conn.execute(sa.select(xattrs.c.value).join(inodes, inodes.c.id == xattrs.c.ino).where(
                inodes.c.object_key == key, xattrs.c.name == index.HEADER_XATTR).limit(1)).scalar()
            return bytes(value) if value is not None else None
        return self._read(run)

    def repair_queue(self, limit: int) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
        """The oldest queued repairs: (key, size, copies wanted, [(site, state)])."""
        def run(conn: Connection) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
            rows = conn.execute(sa.select(repairs.c.key, repairs.c.wanted, objects.c.size).join(
                objects, objects.c.key == repairs.c.key).order_by(repairs.c.since, repairs.c.key).limit(limit)).all()
            copies = self._replica_rows(conn, [r.key for r in rows])
            return [(r.key, int(r.size), int(r.wanted), copies[r.key]) for r in rows]
        return self._read(run)

    def repairs_done(self, keys: list[str]) -> None:
        def run(conn: Connection) -> None:
            for part in _slices(keys):
                conn.execute(repairs.delete().where(repairs.c.key.in_(part)))
        if keys:
            self._txn(run)

    def drop_replica(self, key: str, site: str) -> bool:
        return self._txn(lambda c: c.execute(replicas.delete().where(
            replicas.c.key == key, replicas.c.site == site)).rowcount > 0)

    def objects_at(self, site: str, after: str, limit: int) -> list[tuple[str, int, list[tuple[str, str]]]]:
        def run(conn: Connection) -> list[tuple[str, int, list[tuple[str, str]]]]:
            rows = conn.execute(sa.select(objects.c.key, objects.c.size).join(
                replicas, replicas.c.key == objects.c.key).where(
                replicas.c.site == site, objects.c.key > after).order_by(objects.c.key).limit(limit)).all()
            copies = self._replica_rows(conn, [r.key for r in rows])
            return [(r.key, int(r.size), copies[r.key]) for r in rows]
        return self._read(run)

    def backup_to(self, path: str) -> None:
        if not self.is_sqlite:
            raise errors.UsageError("this metaserver keeps its data in PostgreSQL: back it up with pg_dump "
                                    "(README, 'Backup'), which is online and consistent.")
        import sqlite3

        raw = self.engine.raw_connection()
        try:
            target = sqlite3.connect(path)
            try:
                # SQLite's online backup API: pages copied in steps, writers not blocked for long.
                raw.driver_connection.backup(target, pages=1024)  # type: ignore[union-attr]
            finally:
                target.close()
        finally:
            raw.close()

    def remove_site(self, name: str) -> int:
        def run(conn: Connection) -> int:
            n = conn.execute(replicas.delete().where(replicas.c.site == name)).rowcount
            if conn.execute(sites_t.delete().where(sites_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no site named {name!r} is registered.")
            return n
        return self._txn(run)

    def recorded_at(self, site: str, keys: list[str]) -> set[str]:
        def run(conn: Connection) -> set[str]:
            out: set[str] = set()
            for part in _slices(keys):
                out.update(r.key for r in conn.execute(sa.select(replicas.c.key).where(
                    replicas.c.site == site, replicas.c.key.in_(part))))
            return out
        return self._read(run)

    def object_replicas(self, keys: list[str]) -> dict[str, list[str]]:
        def run(conn: Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {k: [] for k in keys}
            for part in _slices(keys):
                for r in conn.execute(sa.select(replicas.c.key, replicas.c.site).where(
                        replicas.c.key.in_(part), replicas.c.state == "ok")
                        .order_by(replicas.c.site)):
                    out[r.key].append(r.site)
            return out
        return self._read(run)

    def walk_files(self, root: str) -> Iterator[tuple[str, str, int]]:
        """(path, object key, size) of every file at or under ``root``, in path order."""
        for path, row in self._subtree(root, sa.select(inodes.c.object_key, inodes.c.size)
                                       .where(inodes.c.is_dir.is_(False))):
            yield path, row.object_key, row.size

    def walk_files_many(self, roots: list[str]) -> Iterator[tuple[str, str, int]]:
        """``walk_files`` of each root in turn.  Roots that name files (a series' instances, as a
        viewer or ``dgf_down`` asks for them) resolve in one query per directory, not in one
        recursive query each."""
        named: dict[str, Any] = {}
        by_parent: dict[str, list[str]] = {}
        for root in roots:
            parent, _, name = root.rpartition("/")
            if name and (parent == "" or parent.startswith("/")):
                by_parent.setdefault(parent or "/", []).append(name)
        with self._connect() as conn:
            ids = self._dir_ids(conn)
            for parent, names in by_parent.items():
                pid = ids.get(parent)
                if pid is None:
                    continue                             # named when the root itself is walked
                for part in _slices(sorted(set(names))):
                    for row in conn.execute(_Q_CHILDREN_NAMED, {"b_parent": pid, "b_names": part}):
                        named[_join(parent, row.name)] = row
        for root in roots:
            found = named.get(root)
            if found is not None and not found.is_dir:
                yield root, found.object_key, found.size
            else:
                yield from self.walk_files(root)

    def _subtree(self, root: str, extra: Any) -> Iterator[tuple[str, Any]]:
        """Stream (path, row) of the inodes under ``root`` selected by ``extra`` (a select whose
        FROM is ``inodes``), with paths built by a recursive CTE in the database."""
        with self._connect() as conn:
            top = self._resolve(conn, root)
            base = "" if root == "/" else root
            # Both terms cast to TEXT: PostgreSQL wants one type across a recursive CTE.
            sub = sa.select(inodes.c.id, sa.cast(sa.literal(base), sa.Text).label("path")).where(
                inodes.c.id == top.id).cte("sub", recursive=True)
            child = inodes.alias("child")
            sub = sub.union_all(sa.select(child.c.id, sa.cast(sub.c.path + "/" + child.c.name, sa.Text))
                                .where(child.c.parent == sub.c.id))
            query = extra.add_columns(sub.c.path).join_from(inodes, sub, sub.c.id == inodes.c.id) \
                .order_by(sub.c.path)
            for row in conn.execution_options(stream_results=True).execute(query):
                yield (row.path or "/"), row

    # -- identity vault storage -----------------------------------------------------------

    def identity(self, object_key: str) -> tuple[str, bytes, bytes] | None:
        def run(conn: Connection) -> tuple[str, bytes, bytes] | None:
            row = conn.execute(sa.select(identities.c.patient, identities.c.sealed, patients.c.wrapped_key)
                               .join(patients, patients.c.pseudonym == identities.c.patient)
                               .where(identities.c.object_key == object_key)).first()
            return None if row is None else (row.patient, bytes(row.wrapped_key), bytes(row.sealed))
        return self._read(run)

    def replication_overrides(self) -> dict[str, int]:
        def run(conn: Connection) -> dict[str, int]:
            rows = conn.execute(sa.select(xattrs.c.ino, xattrs.c.value).where(xattrs.c.name == REPLICAS_XATTR))
            dirs = self._dir_paths(conn)
            out = {}
            for r in rows:
                try:
                    n = int(bytes(r.value))
                except ValueError:
                    continue
                if r.ino in dirs:
                    out[dirs[r.ino]] = n
            return out
        return self._read(run)

    def identified_sizes(self, keys: list[str]) -> dict[str, int]:
        def run(conn: Connection) -> dict[str, int]:
            rows = conn.execute(sa.select(identities.c.object_key, identities.c.size).where(
                identities.c.object_key.in_(keys), identities.c.size.is_not(None)))
            return {r.object_key: int(r.size) for r in rows}
        return self._read(run) if keys else {}

    def patient_key(self, patient: str) -> bytes | None:
        value = self._read(lambda c: c.execute(sa.select(patients.c.wrapped_key).where(
            patients.c.pseudonym == patient)).scalar())
        return None if value is None else bytes(value)

    def add_patient_key(self, patient: str, wrapped: bytes) -> bytes:
        def run(conn: Connection) -> bytes:
            conn.execute(self._insert_ignore(patients), [{"pseudonym": patient, "wrapped_key": wrapped,
                                                          "created": time.time()}])
            return bytes(conn.execute(sa.select(patients.c.wrapped_key).where(
                patients.c.pseudonym == patient)).scalar_one())
        return self._txn(run)

    def rewrap_patient_keys(self, rewrap: Callable[[bytes, bytes], bytes], kek_id: str) -> int:
        """Re-wrap every patient's data key with ``rewrap(wrapped, label)`` and record the new
        key-encryption key's id, in one transaction: all or nothing."""
        def run(conn: Connection) -> int:
            rows = conn.execute(sa.select(patients.c.pseudonym, patients.c.wrapped_key)).all()
            for r in rows:
                conn.execute(patients.update().where(patients.c.pseudonym == r.pseudonym).values(
                    wrapped_key=rewrap(bytes(r.wrapped_key), r.pseudonym.encode())))
            conn.execute(settings_t.delete().where(settings_t.c.name == "vault.kek_id"))
            conn.execute(settings_t.insert().values(name="vault.kek_id", value=kek_id))
            return len(rows)
        return self._txn(run)

    def erase_patient(self, patient: str) -> int:
        def run(conn: Connection) -> int:
            n = conn.execute(identities.delete().where(identities.c.patient == patient)).rowcount
            conn.execute(study_keys.delete().where(study_keys.c.patient == patient))
            conn.execute(patients.delete().where(patients.c.pseudonym == patient))
            return n
        return self._txn(run)

    # -- principals, sites, audit ---------------------------------------------------------

    def add_principal(self, p: Principal) -> None:
        def run(conn: Connection) -> None:
            try:
                conn.execute(principals_t.insert().values(name=p.name, role=p.role,
                                                          public_key=p.public_key, fingerprint=p.fingerprint))
            except SAIntegrityError as exc:
                raise errors.AlreadyExists(f"principal {p.name!r} or its key is already enrolled.") from exc
        self._txn(run)

    def remove_principal(self, name: str) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(principals_t.delete().where(principals_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no principal named {name!r}.")
        self._txn(run)

    def principals(self) -> list[Principal]:
        return self._read(lambda c: [Principal(r.name, r.role, r.public_key, r.fingerprint) for r in
                                     c.execute(sa.select(principals_t).order_by(principals_t.c.name))])

    def principal_by_fingerprint(self, fp: str) -> Principal | None:
        row = self._read(lambda c: c.execute(sa.select(principals_t).where(
            principals_t.c.fingerprint == fp)).first())
        return None if row is None else Principal(row.name, row.role, row.public_key, row.fingerprint)

    def register_site(self, site: Site, pin: bool = False) -> None:
        def run(conn: Connection) -> None:
            old = conn.execute(sa.select(sites_t).where(sites_t.c.name == site.name)).first()
            if old is not None and old.pinned and not pin:
                if old.host_key.split()[:2] != site.host_key.split()[:2]:
                    raise errors.PermissionDenied(
                        f"site {site.name} presents host key {crypto.fingerprint(site.host_key)}, not the "
                        f"key {crypto.fingerprint(old.host_key)} an admin pinned; if the site was rebuilt, "
                        f"add it again with 'dgf admin site add {site.name} {old.host}:{old.port}'.")
                if not old.zone and site.zone:           # the admin's zone, if given, stands
                    conn.execute(sites_t.update().where(sites_t.c.name == site.name).values(zone=site.zone))
                return
            conn.execute(sites_t.delete().where(sites_t.c.name == site.name))
            # Only an admin says a site is untrusted; a site registering again cannot undo it.
            untrusted = bool(old is not None and old.untrusted) or (pin and site.untrusted)
            conn.execute(sites_t.insert().values(name=site.name, host=site.host, port=site.port,
                                                 host_key=site.host_key, zone=site.zone or None, pinned=pin,
                                                 untrusted=untrusted))
        self._txn(run)

    def sites(self) -> list[Site]:
        return self._read(lambda c: [Site(r.name, r.host, r.port, r.host_key, r.zone or "", bool(r.untrusted))
                                     for r in c.execute(sa.select(sites_t).order_by(sites_t.c.name))])

    def set_site_trust(self, name: str, untrusted: bool) -> None:
        """Mark a site untrusted (it may hold sealed objects only) or trusted again."""
        def run(conn: Connection) -> None:
            if conn.execute(sa.select(sites_t.c.name).where(sites_t.c.name == name)).first() is None:
                raise errors.NotFound(f"no site named {name!r}; see 'dgf admin site list'.")
            if untrusted:
                plain = conn.execute(sa.select(sa.func.count()).select_from(replicas).join(
                    objects, objects.c.key == replicas.c.key).where(
                    replicas.c.site == name, objects.c.seal.is_(None))).scalar() or 0
                if plain:
                    raise errors.UsageError(f"site {name} holds {plain} unsealed objects; drain it first "
                                            f"('dgf admin site drain {name}'), then mark it untrusted.")
            conn.execute(sites_t.update().where(sites_t.c.name == name).values(untrusted=untrusted))
        self._txn(run)

    def object_seals(self, keys: list[str]) -> dict[str, str]:
        """The seals ("SALT_HEX:STUDY") of those of ``keys`` that are sealed objects."""
        def run(conn: Connection) -> dict[str, str]:
            out: dict[str, str] = {}
            for part in _slices(keys):
                for r in conn.execute(sa.select(objects.c.key, objects.c.seal).where(
                        objects.c.key.in_(part), objects.c.seal.isnot(None))):
                    out[r.key] = r.seal
            return out
        return self._read(run)

    def study_keys(self, studies: list[str]) -> dict[str, tuple[str, bytes]]:
        """(patient, wrapped key) of those of ``studies`` that have a data key."""
        def run(conn: Connection) -> dict[str, tuple[str, bytes]]:
            out: dict[str, tuple[str, bytes]] = {}
            for part in _slices(studies):
                for r in conn.execute(sa.select(study_keys).where(study_keys.c.study.in_(part))):
                    out[r.study] = (r.patient, bytes(r.wrapped))
            return out
        return self._read(run)

    def add_study_keys(self, rows: dict[str, tuple[str, bytes]]) -> None:
        """Store new studies' wrapped data keys in one transaction (existing ones win)."""
        if rows:
            now = time.time()
            self._txn(lambda c: c.execute(self._insert_ignore(study_keys), [
                {"study": k, "patient": p, "wrapped": w, "created": now} for k, (p, w) in rows.items()]))

    def get_setting(self, name: str) -> str | None:
        return self._read(lambda c: c.execute(sa.select(settings_t.c.value).where(
            settings_t.c.name == name)).scalar())

    def set_setting(self, name: str, value: str) -> None:
        def run(conn: Connection) -> None:
            conn.execute(settings_t.delete().where(settings_t.c.name == name))
            conn.execute(settings_t.insert().values(name=name, value=value))
        self._txn(run)

    def audit_many(self, entries: list[tuple[str, str, str, str, str]]) -> None:
        if not entries:
            return
        self._txn(lambda c: self._write_audit(c, entries))

    def audit_log(self, limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` records; with ``after``, the oldest ``limit`` after that id."""
        if after:
            return self._read(lambda c: [dict(r._mapping) for r in c.execute(
                sa.select(audit_t).where(audit_t.c.id > after).order_by(audit_t.c.id).limit(limit))])
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(
            sa.select(audit_t).order_by(audit_t.c.id.desc()).limit(limit))])

    # -- queries --------------------------------------------------------------------------

    def _bump_dirs(self, conn: Connection) -> None:
        """Count a change of the directory tree in the database, in the transaction that makes
        it: every metaserver process over this database rebuilds its directory map when the
        count moves, not only the one that made the change."""
        changed = conn.execute(settings_t.update().where(settings_t.c.name == DIRS_VERSION).values(
            value=sa.cast(sa.cast(settings_t.c.value, sa.BigInteger) + 1, sa.String))).rowcount
        if not changed:
            conn.execute(self._insert_ignore(settings_t), [{"name": DIRS_VERSION, "value": "1"}])

    def _dir_paths(self, conn: Connection) -> dict[int, str]:
        """Every directory's path, built once after each change of the tree (a few ms per
        10,000), by whichever metaserver process made it (the database keeps the count)."""
        version = conn.execute(sa.select(settings_t.c.value).where(settings_t.c.name == DIRS_VERSION)).scalar()
        dirs = self._dirs
        if dirs is not None and version == self._dirs_version:
            return dirs
        self._dirs_version = version
        links = {r.id: (r.parent, r.name) for r in conn.execute(
            sa.select(inodes.c.id, inodes.c.parent, inodes.c.name).where(inodes.c.is_dir.is_(True)))}
        dirs = {ROOT: "/"}
        for start in links:
            chain = []
            node = start
            while node not in dirs and node in links:
                chain.append(node)
                node = links[node][0]
            base = dirs.get(node, "/")
            for i in reversed(chain):
                base = _join(base, links[i][1])
                dirs[i] = base
        self._dirs = dirs
        return dirs

    @contextlib.contextmanager
    def _deadline(self, conn: Connection, deadline: float | None) -> Iterator[None]:
        """Interrupt the database's own work past ``deadline`` (a time.monotonic() value)."""
        if deadline is None:
            yield
            return
        if self.is_sqlite:
            raw = conn.connection.driver_connection
            raw.set_progress_handler(lambda: time.monotonic() > deadline, 20000)  # type: ignore[union-attr]
            try:
                yield
            finally:
                raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
            return
        ms = max(1, int((deadline - time.monotonic()) * 1000))
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
        yield

    def query_candidates(self, root: str, plan: sa.Select[Any] | None, with_xml: bool, deadline: float | None = None,
                         after: int = 0) -> Iterator[tuple[int, str, tuple[str, str, str], bytes | None]]:
        """Stream (ino, path, (patient, study, series), XML or None) of the indexed files at or
        under ``root`` whose inode is selected by ``plan`` (a select of inos; None: all) and is
        above ``after``, in inode order (keyset pagination resumes after the last one seen)."""
        try:
            with self._connect() as conn, self._deadline(conn, deadline):
                top = self._resolve(conn, root)
                dirs = self._dir_paths(conn)
                cols = [inodes.c.id, inodes.c.parent, inodes.c.name, levels_t.c.patient, levels_t.c.study,
                        levels_t.c.series]
                joined = inodes.join(levels_t, levels_t.c.ino == inodes.c.id)
                if with_xml:
                    cols.append(xattrs.c.value)
                    joined = joined.join(xattrs, sa.and_(xattrs.c.ino == inodes.c.id,
                                                         xattrs.c.name == index.HEADER_XATTR))
                query = sa.select(*cols).select_from(joined)
                if after:
                    query = query.where(inodes.c.id > after)
                if plan is not None:
                    query = query.where(inodes.c.id.in_(plan))
                allowed: set[int] | None = None
                if not top.is_dir:
                    query = query.where(inodes.c.id == top.id)
                elif root != "/":
                    allowed = {i for i, p in dirs.items() if p == root or p.startswith(root + "/")}
                rows = conn.execution_options(stream_results=True, yield_per=2000).execute(
                    query.order_by(inodes.c.id))
                for row in rows:
                    if allowed is not None and row.parent not in allowed:
                        continue
                    parent = dirs.get(row.parent)
                    if parent is None:                 # created after the map was built
                        self._dirs = None
                        dirs = self._dir_paths(conn)
                        parent = dirs.get(row.parent)
                        if parent is None:             # removed meanwhile
                            continue
                    yield (row.id, _join(parent, row.name), (row.patient, row.study, row.series),
                           bytes(row.value) if with_xml else None)
        except OperationalError as exc:
            if "interrupt" in str(exc).lower():
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression.") from exc
            raise
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == "57014":
                raise errors.QueryTimeout("the query ran past its time limit; narrow the expression.") from exc
            raise

    def query_count(self, plan: sa.Select[Any] | None) -> int:
        """How many indexed files ``plan`` selects, archive-wide (exact plans only)."""
        source: Any = sa.select(levels_t.c.ino) if plan is None else plan
        counted: Any = sa.select(sa.func.count()).select_from(source.subquery())

        def run(conn: Connection) -> int:
            return int(conn.execute(counted).scalar_one())
        return self._read(run)

    def query_estimate(self, select: sa.Select[Any], sample: int = 20_000) -> int:
        """Rows ``select`` (of inos) returns among the first ``sample`` indexed files: a cheap,
        proportional selectivity estimate the planner uses to pick the driving predicate."""
        def run(conn: Connection) -> int:
            bound = conn.execute(sa.select(levels_t.c.ino).order_by(levels_t.c.ino)
                                 .limit(1).offset(sample)).scalar()
            query = select if bound is None else select.where(list(select.selected_columns)[0] <= bound)
            return int(conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one())
        return self._read(run)

    def query_catalogue(self) -> Catalogue:
        return self._read(self.catalogue)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    def save_query(self, name: str, xpath: str, owner: str) -> None:
        def run(conn: Connection) -> None:
            conn.execute(queries_t.delete().where(queries_t.c.name == name))
            conn.execute(queries_t.insert().values(name=name, xpath=xpath, owner=owner, created=time.time()))
        self._txn(run)

    def saved_query_count(self, owner: str) -> int:
        return int(self._read(lambda c: c.execute(sa.select(sa.func.count()).select_from(queries_t).where(
            queries_t.c.owner == owner)).scalar_one()))

    def saved_queries(self) -> dict[str, str]:
        return self._read(lambda c: {r.name: r.xpath for r in c.execute(
            sa.select(queries_t.c.name, queries_t.c.xpath).order_by(queries_t.c.name))})

    def remove_query(self, name: str) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(queries_t.delete().where(queries_t.c.name == name)).rowcount == 0:
                raise errors.NotFound(f"no saved query named {name!r}.")
        self._txn(run)
