"""What every part of the SQL metadata engine stands on: the database connection, the one
transaction helper (retry on conflict, audit in the same transaction), path resolution and the
directory map.  The namespace (:mod:`metaserver.sql`), the header index
(:mod:`metaserver.sqlindex`) and the administrative tables (:mod:`metaserver.sqladmin`) build on it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from dgf import errors
from dgf.limits import RefusalLog
from dgf.types import Stat
from metaserver import index
from metaserver.engine import Released
from metaserver.planner import Catalogue
from metaserver.schema import (
    AUDIT_HEAD,
    audit_hash,
    audit_t,
    dir_changes,
    identities,
    inodes,
    metadata,
    objects,
    settings_t,
    sites_t,
)

T = TypeVar("T")
#: A full disk refuses every write: said once every 10 s, not once a request.
_FULL_LOG = RefusalLog(logging.getLogger("dgf.metaserver"))
#: The settings row counting changes of the directory tree (see SqlEngine._bump_dirs).
DIRS_VERSION = "ns.dirs_version"
#: The tree versions whose changes are kept (dir_changes) for other processes to replay; a map
#: further behind is rebuilt.  Older ones are removed every DIR_CHANGES_PRUNE versions.
DIR_CHANGES_KEPT = 1000
DIR_CHANGES_PRUNE = 100
#: PostgreSQL advisory lock key of the directory tree ("dgf-tree" as a number), taken by a
#: transaction that adds entries under directories (shared) or removes or moves them (exclusive).
TREE_LOCK_KEY = 0x6467662D74726565
SHARED, EXCLUSIVE = "shared", "exclusive"
ROOT = 1

STAT_COLS = (inodes.c.id, inodes.c.name, inodes.c.is_dir, inodes.c.mode, inodes.c.size,
              inodes.c.nlink, inodes.c.mtime, inodes.c.ctime, inodes.c.object_key)


#: The conflict clause of an insert that leaves rows already there alone (SQLite and PostgreSQL).
IGNORE = "ON CONFLICT DO NOTHING"


def _bind_plain_values_directly() -> None:
    """Have the sqlite3 module bind None, bools and bytes without its adaptation protocol.

    For a parameter that is not exactly an int, float, str or bytearray, sqlite3 looks for an
    adapter, finds none, then asks the protocol class for ``__adapt__``, which raises and clears
    an AttributeError each time: ~2,600 instructions a value, 10 % of a commit's (an index row
    binds a NULL number and a boolean flag).  Registered adapters that hand the value back (or
    its int, for a bool: what sqlite3 stores anyway) bind the same values with one dict hit.
    Module-wide and idempotent: every sqlite3 user in the process binds the same values as before."""
    sqlite3.register_adapter(type(None), {None: None}.__getitem__)    # a C callable: None -> None
    sqlite3.register_adapter(bool, int)
    sqlite3.register_adapter(bytes, bytes)                              # bytes(b) is b


class InodeRow(NamedTuple):
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
# updates cost more than SQLite executing them (a step of a path walk: 82 us built, 18 us here).
Q_ROOT = sa.select(*STAT_COLS).where(inodes.c.id == ROOT)
Q_DIRS_VERSION = sa.select(settings_t.c.value).where(settings_t.c.name == DIRS_VERSION)
Q_DIRS = sa.select(inodes.c.id, inodes.c.parent, inodes.c.name).where(inodes.c.is_dir.is_(True))
Q_DIR_CHANGES = sa.select(dir_changes).where(
    dir_changes.c.version > sa.bindparam("b_since"), dir_changes.c.version <= sa.bindparam("b_upto")
).order_by(dir_changes.c.version, dir_changes.c.seq)
Q_CHILD = sa.select(*STAT_COLS).where(inodes.c.parent == sa.bindparam("b_parent"),
                                        inodes.c.name == sa.bindparam("b_name"))
Q_CHILDREN = sa.select(*STAT_COLS).where(inodes.c.parent == sa.bindparam("b_parent")).order_by(inodes.c.name)
Q_CHILDREN_NAMED = sa.select(*STAT_COLS).where(
    inodes.c.parent == sa.bindparam("b_parent"), inodes.c.name.in_(sa.bindparam("b_names", expanding=True)))
U_NLINK = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(
    nlink=inodes.c.nlink + sa.bindparam("b_delta"), mtime=sa.bindparam("b_now"))
U_MTIME = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(mtime=sa.bindparam("b_now"))
U_FILE = inodes.update().where(inodes.c.id == sa.bindparam("b_id")).values(
    object_key=sa.bindparam("b_key"), size=sa.bindparam("b_size"), mtime=sa.bindparam("b_now"),
    ctime=sa.bindparam("b_now"))


class SetRows:
    """The rows of committed series sets by set id, which headers join (sqlindex): a set's rows
    never change, and no id is given twice.  Bounded by rows, not sets (a set of a multi-frame
    series' headers can hold thousands): cleared when full."""

    #: ~150 bytes a row in memory: ~75 MB at most.
    LIMIT = 500_000

    def __init__(self) -> None:
        self._sets: dict[int, frozenset[Any]] = {}
        self._rows = 0

    def get(self, set_id: int) -> frozenset[Any] | None:
        return self._sets.get(set_id)

    def add(self, sets: dict[int, frozenset[Any]]) -> None:
        n = sum(map(len, sets.values()))
        if self._rows + n > self.LIMIT:
            self._sets, self._rows = {}, 0
        self._sets.update(sets)
        self._rows += n


class SeriesFiles:
    """A committed file of each series this process indexed lately, series UID -> inode, for a
    header alone in its commit to find one of its series (sqlindex._siblings) wherever the
    series' files are.  A hint only, checked against the index where used (the file may be
    gone).  Bounded: cleared when full."""

    LIMIT = 65_536

    def __init__(self) -> None:
        self._files: dict[str, int] = {}

    def get(self, series: str) -> int | None:
        return self._files.get(series)

    def add(self, files: dict[str, int]) -> None:
        if len(self._files) + len(files) > self.LIMIT:
            self._files = {}
        self._files.update(files)


def _quoted(columns: tuple[str, ...]) -> str:
    """Column names for a statement written by hand (_bulk, _bulk_returning)."""
    return ", ".join(f'"{c}"' for c in columns)


def stat_of(path: str, row: Any) -> Stat:
    """``path``'s entry from a row of ``STAT_COLS``, unpacked by position: a listing builds
    thousands, and a row's attribute lookups were most of ``ls``'s server time."""
    ino, _, is_dir, mode, size, nlink, mtime, ctime, key = row
    return Stat(path, ino, bool(is_dir), mode, size, mtime, ctime, nlink, key)


def stats_of(parent: str, rows: Iterable[Any]) -> list[Stat]:
    """The entries of directory ``parent`` from rows of ``STAT_COLS``."""
    return [stat_of(join_path(parent, row[1]), row) for row in rows]


def inserted_id(result: Any) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise errors.ServerError("the database returned no id for a new entry.")
    return int(key[0])


def slices(keys: list[T], n: int = 500) -> Iterator[list[T]]:
    """``keys`` in slices short enough for one ``IN (...)`` list."""
    for i in range(0, len(keys), n):
        yield keys[i:i + n]


def join_path(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name


class DirMade(NamedTuple):
    """A directory made (by mkdir, or as a parent of files a commit publishes)."""
    ino: int
    parent: int
    name: str


class DirMoved(NamedTuple):
    """A directory given a new parent or name; the directories below it move with it."""
    ino: int
    parent: int
    name: str


class DirGone(NamedTuple):
    """A directory removed (rmdir, rm -r, or an empty one a rename replaced)."""
    ino: int


TreeChange = DirMade | DirMoved | DirGone


def tree_changed(conn: Connection, *changes: TreeChange) -> None:
    """Record changes of the directory tree in the transaction that makes them.  Committed, they
    move the tree's version in the database and are filed under it (``dir_changes``), for other
    metaserver processes to replay into their maps; this process's map learns them at once
    (``SqlBase._learn_dirs``), in this order."""
    conn.info.setdefault("dgf.after", {}).setdefault("tree", []).extend(changes)


def _journal_row(version: int, seq: int, change: TreeChange) -> dict[str, Any]:
    if isinstance(change, DirGone):
        return {"version": version, "seq": seq, "kind": "g", "ino": change.ino, "parent": None, "name": None}
    return {"version": version, "seq": seq, "kind": "m" if isinstance(change, DirMade) else "v",
            "ino": change.ino, "parent": change.parent, "name": change.name}


def _journalled(row: Any) -> TreeChange:
    if row.kind == "g":
        return DirGone(row.ino)
    return (DirMade if row.kind == "m" else DirMoved)(row.ino, row.parent, row.name)


def _count(value: Any) -> int | None:
    """The tree's version as stored (a string of digits), as a number."""
    return int(value) if value is not None and str(value).isdigit() else None


def _parent_path(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _children(dirs: dict[int, str], ids: dict[str, int]) -> dict[int, set[int]]:
    """The directories in each directory that has any, from the map and its inverse."""
    kids: dict[int, set[int]] = {}
    for i, p in dirs.items():
        if p != "/":
            parent = ids.get(_parent_path(p))
            if parent is not None:
                kids.setdefault(parent, set()).add(i)
    return kids


def _subtree(kids: dict[int, set[int]], top: int) -> list[int]:
    """``top`` and every directory below it."""
    out, stack = [], [top]
    while stack:
        i = stack.pop()
        out.append(i)
        stack.extend(kids.get(i, ()))
    return out


def _unlink_child(kids: dict[int, set[int]], ids: dict[str, int], ino: int, path: str) -> None:
    parent = ids.get(_parent_path(path))
    siblings = kids.get(parent) if parent is not None else None
    if parent is not None and siblings is not None:
        siblings.discard(ino)
        if not siblings:
            del kids[parent]


def _apply(dirs: dict[int, str], ids: dict[str, int] | None, changes: list[TreeChange],
           kids: dict[int, set[int]] | None = None) -> bool:
    """Apply ``changes`` in order to ``dirs`` (id -> path) and its inverse ``ids`` where one is
    held, and to ``kids`` (each directory's directories, :func:`_children`), which needs ``ids``:
    with it a move visits the directories it moves instead of comparing every directory's path
    with its own.  False when a change names a directory ``dirs`` lacks (the map is then
    unusable)."""
    if ids is None:
        kids = None
    for change in changes:
        if isinstance(change, DirGone):
            path = dirs.pop(change.ino, None)
            if path is None:
                return False
            if ids is not None:
                if kids is not None:
                    _unlink_child(kids, ids, change.ino, path)
                    kids.pop(change.ino, None)
                ids.pop(path, None)
            continue
        base = dirs.get(change.parent)
        if base is None:
            return False
        new = join_path(base, change.name)
        if isinstance(change, DirMade):
            if ids is not None:
                if kids is not None:
                    if change.ino in dirs:
                        _unlink_child(kids, ids, change.ino, dirs[change.ino])
                    kids.setdefault(change.parent, set()).add(change.ino)
                ids[new] = change.ino
            dirs[change.ino] = new
            continue
        old = dirs.get(change.ino)
        if old is None:
            return False
        if kids is not None and ids is not None:
            moved = [(i, dirs[i]) for i in _subtree(kids, change.ino) if i in dirs]
            _unlink_child(kids, ids, change.ino, old)
            kids.setdefault(change.parent, set()).add(change.ino)
        else:
            below = old + "/"
            moved = [(i, p) for i, p in dirs.items() if p == old or p.startswith(below)]
        if ids is not None:
            for _, p in moved:                   # all old paths out before any new one is in
                ids.pop(p, None)
        for i, p in moved:
            dirs[i] = new + p[len(old):]
            if ids is not None:
                ids[dirs[i]] = i
    return True


class SqlBase:
    """Connections, transactions, the audit chain, path resolution and the directory map."""

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
            _bind_plain_values_directly()
        else:
            self.engine = sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True,
                                           pool_timeout=db_wait_s)
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None
        self._local = threading.local()
        from metaserver import migrate

        self.schema_revision = migrate.upgrade(self.engine, self._legacy_schema)
        self._key_ids: dict[str, int] = {}          # committed catalogue entries, path -> id
        self._multi: set[str] = set()                # committed paths flagged multi-valued
        self._set_rows = SetRows()                   # committed series sets' rows (sqlindex)
        self._series_files = SeriesFiles()           # a recent file of each series (sqlindex)
        self._catalogue: tuple[int, Catalogue] | None = None
        self._dirs: dict[int, str] | None = None     # directory id -> path (_dir_paths, _learn_dirs)
        self._dirs_version: int | None = None        # the database's DIRS_VERSION it is at
        self._dir_ids_of: tuple[dict[int, str], dict[str, int]] | None = None
        # Each directory's directories, for the map it is kept with (_learn_dirs, _apply).
        self._kids_of: tuple[dict[int, str], dict[int, set[int]]] | None = None
        self._dirs_lock = threading.Lock()           # learning tree changes (_learn_dirs)
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(sa.select(inodes.c.id).where(inodes.c.id == ROOT)).first() is None:
                # The database assigns the id (an explicit one would not advance PostgreSQL's
                # sequence); in a fresh database the first inode is 1.
                root = inserted_id(conn.execute(inodes.insert().values(
                    parent=None, name="", is_dir=True, mode=0o755, size=0, nlink=2, mtime=now, ctime=now)))
                if root != ROOT:
                    raise errors.ServerError(f"the database gave the root directory id {root}, not {ROOT}; "
                                             "use an empty database.")
            # The tree's version exists before any change: each change then moves it by an UPDATE,
            # whose row lock puts concurrent changes in order (_bump_dirs).
            conn.execute(self._insert_ignore(settings_t), [{"name": DIRS_VERSION, "value": "0"}])

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

    def _audit_in(self, conn: Connection, released: Released | None) -> None:
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

    def _txn(self, fn: Callable[[Connection], T], tree: str | None = None) -> T:
        """Run ``fn`` in one transaction, retrying on conflicts with other writers (``_retryable``).

        ``tree`` says how the transaction changes the directory tree, where it does.  Adding
        entries under directories (``SHARED``) and removing or moving them (``EXCLUSIVE``)
        check the tree, then write: a removal checked a directory empty while an upload added
        to it, or two renames each moved a directory under the other, and files were left
        where no path reaches them.  On PostgreSQL, whose transactions run side by side, these
        take an advisory lock before reading anything: any number of adders at once, a remover
        or mover alone.  SQLite has one writer at a time, which every write transaction
        becomes before its first read (``BEGIN IMMEDIATE``)."""
        for attempt in range(6):
            try:
                with self._write_lock or contextlib.nullcontext(), self._begin() as conn:
                    if tree is not None and not self.is_sqlite:
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock_shared(:k)" if tree == SHARED else
                                             "SELECT pg_advisory_xact_lock(:k)"), {"k": TREE_LOCK_KEY})
                    # conn.info belongs to the pooled DBAPI connection, which outlives this
                    # transaction: what an earlier one left there is not this one's.
                    conn.info.pop("dgf.after", None)
                    conn.info.pop("dgf.released", None)
                    result = fn(conn)
                    self._audit_in(conn, conn.info.pop("dgf.released", None))
                    version = None
                    if conn.info.get("dgf.after", {}).get("tree"):
                        version = self._bump_dirs(conn, conn.info["dgf.after"]["tree"])
                    after = conn.info.pop("dgf.after", {})
                self._local.audit = None         # written once, with the first transaction
                # Committed: now in-process caches may learn what the transaction did.
                self._key_ids.update(after.get("keys", {}))
                self._multi.update(after.get("multi", ()))
                self._set_rows.add(after.get("sets", {}))
                self._series_files.add(after.get("series", {}))
                if after.get("tree") and version is not None:
                    self._learn_dirs(after["tree"], version - 1, version)
                return result
            except (OperationalError, DBAPIError) as exc:
                if self._full(exc):
                    _FULL_LOG("the database has no room left (its disk is full): every write is refused "
                              "until space is freed; reads go on")
                    raise errors.StorageFull("the metadata server's database has no room left (its disk is full); "
                                             "nothing was changed. An admin must free space on the metaserver.") from exc
                if attempt == 5 or not self._retryable(exc):
                    raise
                time.sleep(0.01 * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _full(exc: DBAPIError) -> bool:
        """SQLite's SQLITE_FULL, PostgreSQL's disk_full (SQLSTATE 53100)."""
        orig = exc.orig
        code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
        return getattr(orig, "sqlite_errorname", "") == "SQLITE_FULL" or code == "53100"

    @staticmethod
    def _retryable(exc: DBAPIError) -> bool:
        """Locks, serialization failures and deadlocks; and a unique key another metaserver
        process committed between this transaction's check and its insert (two uploads making
        the same new directory through two metaservers): the retry finds it and uses it, or
        refuses by name."""
        text = str(exc.orig).lower() if exc.orig is not None else ""
        code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
        return "locked" in text or "busy" in text or "unique constraint failed" in text or \
            code in ("40001", "40P01", "23505")

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self._connect() as conn, conn.begin():
            if self.is_sqlite:
                # The driver would begin at the first write, after this transaction's reads: a
                # check made by them could be stale by its first insert.  Writer from the start.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self._connect() as conn:
            return fn(conn)

    def _bulk(self, conn: Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
              conflict: str = "") -> None:
        """Insert many rows by the driver's own bulk path: executemany, or COPY on PostgreSQL
        where no ``conflict`` clause (``ON CONFLICT ...``) is given.  Commits write a dozen
        rows a file, and SQLAlchemy's per-row parameter handling cost more than SQLite's insert
        of the small ones; the values must already be what the columns store."""
        if not rows:
            return
        names = _quoted(columns)
        if self.is_sqlite or conflict:
            mark = "?" if self.is_sqlite else "%s"
            conn.exec_driver_sql(f"INSERT INTO {table} ({names}) VALUES ({', '.join([mark] * len(columns))}) "
                                 f"{conflict}", rows)
            return
        with conn.connection.driver_connection.cursor().copy(  # type: ignore[union-attr]
                f"COPY {table} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _bulk_returning(self, conn: Connection, table: str, columns: tuple[str, ...],
                        rows: list[tuple[Any, ...]], returning: tuple[str, ...]) -> list[Any]:
        """Insert rows as :meth:`_bulk` does, as multi-row INSERTs, and return each new row's
        ``returning`` columns, in no promised order (match them by a unique key).  SQLAlchemy's
        own multi-row path handled each row's parameters in Python (~10 us a new inode)."""
        mark = "?" if self.is_sqlite else "%s"
        one = "(" + ", ".join([mark] * len(columns)) + ")"
        head = f"INSERT INTO {table} ({_quoted(columns)}) VALUES "
        tail = f" RETURNING {_quoted(returning)}"
        per = 30_000 // len(columns)                # SQLite binds at most 32,766 values a statement
        out: list[Any] = []
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            out.extend(conn.exec_driver_sql(head + ", ".join([one] * len(chunk)) + tail,
                                            tuple(itertools.chain.from_iterable(chunk))))
        return out

    def _insert_ignore(self, table: sa.Table) -> Any:
        dialect = postgresql if not self.is_sqlite else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    def _upsert(self, table: sa.Table, keys: list[str], update: list[str]) -> Any:
        """An insert that, where a row with the same ``keys`` exists, sets its ``update`` columns."""
        ins = (postgresql if not self.is_sqlite else sqlite).insert(table)
        return ins.on_conflict_do_update(index_elements=[table.c[k] for k in keys],
                                         set_={c: ins.excluded[c] for c in update})

    def _resolve(self, conn: Connection, path: str, cache: dict[str, Any] | None = None) -> Any:
        if cache is not None and path in cache:
            return cache[path]
        row: Any = conn.execute(Q_ROOT).one()
        walked = ""
        for part in [p for p in path.split("/") if p]:
            if not row.is_dir:
                raise errors.NotADirectory(f"{walked} is not a directory.")
            walked += "/" + part
            if cache is not None and walked in cache:
                row = cache[walked]
                continue
            row = conn.execute(Q_CHILD, {"b_parent": row.id, "b_name": part}).first()
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
        return conn.execute(Q_CHILD, {"b_parent": parent_id, "b_name": name}).first()

    def _looked_up(self, conn: Connection, path: str) -> Any:
        """``path``'s row for a read: its parent directory from the directory map (rebuilt only
        when the tree changes), then one query by (parent, name), instead of one per component
        from the root.  Anything the map cannot answer takes the walk, with its precise errors."""
        parent, _, name = path.rstrip("/").rpartition("/")
        if name:
            ids = self._dir_ids(conn)
            pid = ids.get(parent or "/")
            if pid is not None:
                row = conn.execute(Q_CHILD, {"b_parent": pid, "b_name": name}).first()
                if row is not None:
                    return row
        return self._resolve(conn, path)

    def _dir_ids(self, conn: Connection) -> dict[str, int]:
        """Every directory's id by path (the inverse of ``_dir_paths``, kept with it)."""
        dirs = self._dir_paths(conn)
        with self._dirs_lock:                    # _learn_dirs grows the map in place
            cached = self._dir_ids_of
            if cached is None or cached[0] is not dirs:
                cached = self._dir_ids_of = (dirs, {p: i for i, p in dirs.items()})
        return cached[1]

    def _bump_dirs(self, conn: Connection, changes: list[TreeChange]) -> int | None:
        """Count a change of the directory tree in the database and file ``changes`` under the
        new count, in the transaction that makes them: every metaserver process over this
        database sees the count move and replays the changes into its directory map
        (``_dir_paths``).  Returns the new count (None if the stored one is not a number)."""
        value = conn.execute(settings_t.update().where(settings_t.c.name == DIRS_VERSION).values(
            value=sa.cast(sa.cast(settings_t.c.value, sa.BigInteger) + 1, sa.String))
            .returning(settings_t.c.value)).scalar()
        if value is None or not str(value).isdigit():
            return None
        version = int(value)
        conn.execute(dir_changes.insert(), [_journal_row(version, seq, c) for seq, c in enumerate(changes)])
        if version % DIR_CHANGES_PRUNE == 0:
            conn.execute(dir_changes.delete().where(dir_changes.c.version <= version - DIR_CHANGES_KEPT))
        return version

    def _learn_dirs(self, changes: list[TreeChange], since: int, version: int) -> bool:
        """Changes of the directory tree committed from tree version ``since`` to ``version``,
        in order: when the map this process holds is at ``since``, it learns them instead of
        being rebuilt from every directory in the database (0.3 s at 140,000 directories; it
        was 0.8-1.0 s, after every mkdir, rmdir or rename on the mount).  A map at
        ``version`` or later has them already (a reader replayed them first); one further
        behind is left for the next lookup to replay (``_dir_paths``).  A change naming a
        directory the map does not hold drops the map.  Returns whether the map has them.

        Directories made or removed are learnt in place, under ``_dirs_lock``: an upload into new
        series makes some in most of its commits, ``rm -r`` on the mount removes them one by
        one, and copying the map cost 17.5 ms of a 200-file commit at 240,000 directories.  A
        reader may then meet a directory its transaction does not see yet, which its query does
        not find, or miss one it still sees, which it then looks up from the root.  A move is
        learnt on copies of the map and its inverse, which then replace them: a reader holding
        the old map keeps every path as it was, not some moved and some not.  The directories a
        move changes are found from each directory's directories, kept with the map (a move at
        196,000 directories: 25 ms, the copies most of it; 39 when every path was compared).
        Whatever iterates over a map holds the lock."""
        with self._dirs_lock:
            dirs, built = self._dirs, self._dirs_version
            if dirs is None or built is None or built < since:
                return False
            if built >= version:
                return True
            if built != since:
                return False
            cached = self._dir_ids_of
            ids = cached[1] if cached is not None and cached[0] is dirs else None
            kids = self._kids_of[1] if self._kids_of is not None and self._kids_of[0] is dirs else None
            moves = any(isinstance(c, DirMoved) for c in changes)
            if moves:
                # A move finds the directories it moves through ``kids``, built at the first.
                if ids is None:
                    ids = {p: i for i, p in dirs.items()}
                if kids is None:
                    kids = _children(dirs, ids)
                dirs, ids = dict(dirs), dict(ids)
            self._kids_of = None                 # until the changes are in
            if not _apply(dirs, ids, changes, kids):
                self._dirs = None
                return False
            if moves:
                self._dirs = dirs
                self._dir_ids_of = (dirs, ids) if ids is not None else None
            if kids is not None and ids is not None:
                self._kids_of = (dirs, kids)
            self._dirs_version = version
            return True

    def _dir_paths(self, conn: Connection) -> dict[int, str]:
        """Every directory's path.  Built when first needed (~2 us a directory); after that this
        process learns its own changes of the tree as it commits them (``_learn_dirs``) and
        replays other processes' from ``dir_changes`` when the database's count of changes has
        moved; a map more than ``DIR_CHANGES_KEPT`` changes behind is rebuilt.  The map grows in
        place as directories are made: look entries up freely, but iterate over it only under
        ``_dirs_lock``."""
        version = _count(conn.execute(Q_DIRS_VERSION).scalar())
        with self._dirs_lock:
            dirs, built = self._dirs, self._dirs_version
        if dirs is not None and version == built:
            return dirs
        if dirs is not None and built is not None and version is not None and 0 < version - built <= DIR_CHANGES_KEPT:
            rows = conn.execute(Q_DIR_CHANGES, {"b_since": built, "b_upto": version}).all()
            # Every version in between, or none replayed: older ones were removed, or written
            # by a dgf that kept none.
            if {r.version for r in rows} == set(range(built + 1, version + 1)) and \
                    self._learn_dirs([_journalled(r) for r in rows], built, version):
                with self._dirs_lock:
                    if self._dirs is not None and self._dirs_version == version:
                        return self._dirs
        return self._rebuilt_dirs(conn, version)

    def _rebuilt_dirs(self, conn: Connection, version: int | None) -> dict[int, str]:
        """The directory map read from every directory in the database, filed under ``version``
        (140,000 directories: ~0.3 s, a third of it reading the partial index ``ix_inodes_dirs``
        instead of every inode)."""
        # Read after the version: the map is never older than the version it is filed under.
        dirs = {ROOT: "/"}
        pending: dict[int, tuple[int, str]] = {}
        # In the index's order, by parent: a parent made before its directories comes first,
        # and they join the map in one step.  The rest (moved under a newer parent) follow.
        for ino, parent, name in conn.execute(Q_DIRS):
            base = dirs.get(parent)
            if base is not None:
                dirs[ino] = ("" if base == "/" else base) + "/" + name
            elif ino != ROOT:
                pending[ino] = (parent, name)
        for start in pending:
            chain = []
            node = start
            while node not in dirs and node in pending:
                chain.append(node)
                node = pending[node][0]
            base = dirs.get(node, "/")
            for i in reversed(chain):
                base = join_path(base, pending[i][1])
                dirs[i] = base
        with self._dirs_lock:
            self._dirs, self._dirs_version, self._kids_of = dirs, version, None
        return dirs

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
